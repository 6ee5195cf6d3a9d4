"""Repair methods: each maps (adapter, reference) to (repaired adapter, per-module report).

Every method is a :class:`~vllm_safeguard.methods.base.Method` in :data:`METHODS`: its ``Options``
model (a help text per field), the artifacts it needs (located, loaded and hashed by
:mod:`vllm_safeguard.core.artifacts`) and ``run``. :func:`repair` adds what all methods share: option
validation, the adapter risk score (reused when the caller already scored it), the "zero modules
matched" refusal, the rank bound, the module/layer counts and timing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from ..core.adapter import LoRAAdapter, LoRAModule, layer_index
from ..core.lowrank import all_finite, refactorize
from ..core.reference import AlignmentReference
from ..core.report import ModuleReport, RepairReport
from ..core.risk import RiskReport, score_adapter
from ..errors import ConfigError, RepairError
from . import nlsr, nlsr_datafree, safegene, safelora, safelora_subspace, translator
from .base import Method, MethodOutput, RepairResult

__all__ = ["METHODS", "Method", "MethodOutput", "RepairResult", "parse_options", "register_method", "repair"]

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        safelora.METHOD,
        safelora_subspace.METHOD,
        nlsr.METHOD,
        nlsr_datafree.METHOD,
        safegene.METHOD,
        translator.METHOD,
    )
}


def register_method(method: Method) -> None:
    """Add a method under ``method.name`` (the config accepts every registered name)."""
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
    artifacts: Mapping[str, Any] | None = None,
    risk: RiskReport | None = None,
) -> RepairResult:
    """Repair ``adapter`` with ``method`` and report what was done, module by module.

    ``artifacts``: the loaded artifact of each kind the method declares, by kind name (e.g.
    ``{"safety_adapter": SafetyAdapter}``). ``risk``: the adapter's risk report when the caller has
    already scored this very adapter (admission does), so it is not computed twice.

    Raises:
        ConfigError: unknown method or invalid options (the message quotes the bad value).
        RepairError: no adapter module is covered by the reference (a silent no-op would serve an
            unrepaired adapter), the method needs an artifact and none was given, or the result
            is not finite / breaks the rank bound.
    """
    opts = parse_options(method, options)
    spec = METHODS[method]
    given = dict(artifacts or {})
    for kind in spec.artifacts:
        if given.get(kind.name) is None:
            raise RepairError(
                f"method {method!r} needs {kind.what} (none configured); build it with {kind.how}"
            )
    problem = spec.reference_problem(reference) if spec.reference_problem else None
    if problem:
        raise RepairError(problem)
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f"max_rank must be >= 1, got {max_rank!r}")
    t0 = time.perf_counter()
    if risk is None:
        risk = score_adapter(adapter, reference)
    if not risk.modules:
        raise RepairError(
            f"none of the adapter's {len(adapter.modules)} modules is covered by the alignment reference "
            f"(e.g. {next(iter(adapter.modules), '<none>')!r}); refusing to pass it through unrepaired"
        )
    needed = {kind.name: given[kind.name] for kind in spec.artifacts}
    out = spec.run(adapter, reference, opts, max_rank=max_rank, **needed)
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
