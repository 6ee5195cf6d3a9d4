"""Repair methods: each maps (adapter, reference) to (repaired adapter, per-module report).

Every method module exposes ``Options`` (a pydantic model with a help text per field) and
``repair_modules(adapter, reference, options, *, max_rank, safety) -> MethodOutput``. :func:`repair`
adds what all methods share: option validation, the adapter risk score, the "zero modules matched"
refusal, the module/layer counts and timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from ..adapter import LoRAAdapter, LoRAModule, layer_index
from ..errors import ConfigError, RepairError
from ..lowrank import all_finite, refactorize
from ..reference import AlignmentReference
from ..report import ModuleReport, RepairReport
from ..risk import score_adapter

if TYPE_CHECKING:
    from ..safegene import SafetyAdapter
    from ..translator.model import Translator


@dataclass
class MethodOutput:
    modules: dict[str, LoRAModule]
    reports: list[ModuleReport]
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RepairResult:
    adapter: LoRAAdapter
    report: RepairReport


@dataclass(frozen=True)
class Method:
    name: str
    options: type[BaseModel]
    run: Callable[..., MethodOutput]
    needs_safety_adapter: bool = False
    needs_translator: bool = False


def _registry() -> dict[str, Method]:
    from . import nlsr, safegene, safelora, translator

    return {
        "safelora": Method("safelora", safelora.Options, safelora.repair_modules),
        "nlsr": Method("nlsr", nlsr.Options, nlsr.repair_modules),
        "safegene": Method("safegene", safegene.Options, safegene.repair_modules, needs_safety_adapter=True),
        "translator": Method(
            "translator", translator.Options, translator.repair_modules, needs_translator=True
        ),
    }


METHODS: dict[str, Method] = _registry()


def register_method(method: Method) -> None:
    """Add a method (used by later methods such as the translator) under ``method.name``."""
    METHODS[method.name] = method


def parse_options(method: str, options: dict[str, Any] | None) -> BaseModel:
    if method not in METHODS:
        raise ConfigError(f"unknown repair method {method!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[method].options.model_validate(options or {})
    except ValidationError as e:
        raise ConfigError(f"invalid options for method {method!r}: {e}") from e


def repair(
    adapter: LoRAAdapter,
    reference: AlignmentReference,
    method: str,
    options: dict[str, Any] | None = None,
    *,
    max_rank: int | None = None,
    safety: SafetyAdapter | None = None,
    translator: Translator | None = None,
) -> RepairResult:
    """Repair ``adapter`` with ``method`` and report what was done, module by module.

    Raises:
        ConfigError: unknown method or invalid options (the message quotes the bad value).
        RepairError: no adapter module is covered by the reference (a silent no-op would serve an
            unrepaired adapter), the method needs a safety adapter and none was given, or the result
            is not finite / breaks the rank bound.
    """
    opts = parse_options(method, options)
    spec = METHODS[method]
    if spec.needs_safety_adapter and safety is None:
        raise RepairError(f"method {method!r} needs a SafeGene safety adapter (none configured)")
    if spec.needs_translator and translator is None:
        raise RepairError(f"method {method!r} needs a trained translator artifact (none configured)")
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f"max_rank must be >= 1, got {max_rank!r}")
    t0 = time.perf_counter()
    risk = score_adapter(adapter, reference)
    if not risk.modules:
        raise RepairError(
            f"none of the adapter's {len(adapter.modules)} modules is covered by the alignment reference "
            f"(e.g. {next(iter(adapter.modules), '<none>')!r}); refusing to pass it through unrepaired"
        )
    extra_args: dict[str, Any] = {"translator": translator} if spec.needs_translator else {}
    out = spec.run(adapter, reference, opts, max_rank=max_rank, safety=safety, **extra_args)
    by_name = {r.module: r for r in out.reports}
    for name, mod in adapter.modules.items():
        rep = by_name.get(name)
        if rep is None:
            rep = ModuleReport(
                module=name, layer=layer_index(name), action="unmatched", rank_in=mod.rank, rank_out=mod.rank
            )
            out.reports.append(rep)
        mr = risk.modules.get(name)
        if mr is not None:
            rep.risk, rep.subspace_energy = mr.risk, mr.subspace_energy
    for name, mod in list(out.modules.items()):
        if max_rank is not None and mod.rank > max_rank:
            # An input rank above the serving bound: keep its best rank-max_rank approximation.
            b2, a2, kept = refactorize(mod.scaled_b(), mod.lora_a, max_rank)
            out.modules[name] = mod = LoRAModule(name, a2, b2, 1.0)
            rep = by_name.get(name)
            if rep is not None:
                rep.rank_out, rep.energy_kept = mod.rank, kept
            out.notes.append(f"{name}: rank bounded to {mod.rank} (energy kept {kept:.4f})")
        if not all_finite(mod.lora_a, mod.lora_b):
            raise RepairError(f"{method}: non-finite factors produced for {name}")
    touched = [r for r in out.reports if r.action not in ("kept", "unmatched")]
    report = RepairReport(
        method=method,
        options=opts.model_dump(),
        risk_score=risk.score,
        modules_total=len(adapter.modules),
        modules_matched=len(risk.modules),
        modules_touched=len(touched),
        layers_repaired=len({r.layer for r in touched}),
        max_rank_out=max((m.rank for m in out.modules.values()), default=0),
        duration_s=time.perf_counter() - t0,
        modules=sorted(out.reports, key=lambda r: r.module),
        notes=out.notes,
        summary=out.summary,
    )
    return RepairResult(adapter.replace_modules(out.modules), report)
