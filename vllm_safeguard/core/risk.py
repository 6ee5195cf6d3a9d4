"""Risk of an adapter: how much of the alignment delta its update undoes.

Semantics (module with alignment delta ``V ~= sum_j s_j u_j v_j^T``, adapter update ``dW = B A`` with
the scaling already folded into ``B``, see :mod:`vllm_safeguard.admission.canonical`)::

    c_j      = u_j^T dW v_j                    # the update's coordinate along alignment direction j
    undone_j = max(-c_j, 0)                    # how far it pushes against what alignment added
    risk_m   = sum_j s_j undone_j / sum_j s_j^2 # 0: never against alignment; 1: cancels it exactly
    score    = max over the adapter's covered modules of risk_m

``risk_m`` is not clamped: over-cancelling the alignment delta (``c_j = -3 s_j``) scores *higher* than
cancelling it (3 vs 1), so pushing harder never hides an update. The adapter score is the worst
module, not a mean over the adapter's own modules: adding modules that do nothing (zero updates, or
updates orthogonal to the reference) cannot lower it. Also reported: ``pooled`` (sum of ``undone``
over the sum of the reference's ``mass`` over *every* reference module, so it also cannot be diluted),
and ``subspace_energy = ||U^T dW||_F^2 / ||dW||_F^2`` per module.

Every number a decision reads must be finite: :func:`score_adapter` raises
:class:`~vllm_safeguard.errors.AdapterValidationError` otherwise (a NaN compares false with every
threshold, so letting it through would read as "harmless"). All terms are computed through the factors
in O((out + in) * r * k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import AdapterValidationError
from .adapter import LoRAAdapter, LoRAModule
from .lowrank import frob2
from .reference import AlignmentReference, ModuleSubspace


@dataclass
class ModuleRisk:
    risk: float
    subspace_energy: float
    undone: float  # numerator: sum_j s_j max(-c_j, 0)
    mass: float  # denominator: sum_j s_j^2


@dataclass
class RiskReport:
    score: float  # worst covered module
    modules: dict[str, ModuleRisk] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    pooled: float = 0.0  # sum undone / sum of the mass of every reference module
    worst_module: str | None = None


def _finite(value: float, what: str, module: str) -> float:
    if not math.isfinite(value):
        raise AdapterValidationError(
            f"risk term {what} is not finite for module {module!r} (the factors overflow fp32 in the "
            "scoring maths); refusing rather than reading it as harmless",
            key=module,
            value=value,
            has_value=True,
        )
    return value


def module_risk(mod: LoRAModule, sub: ModuleSubspace) -> ModuleRisk:
    b = mod.scaled_b()
    utb = sub.u.T @ b  # [k, r]
    av = mod.lora_a @ sub.vh.T  # [r, k]
    coords = (utb * av.T).sum(1)  # c_j = u_j^T B A v_j
    s = sub.s
    undone = _finite(float((s * (-coords).clamp(min=0)).sum()), "undone", mod.name)
    mass = _finite(float((s**2).sum()), "reference mass", mod.name)
    total = _finite(float(frob2(b, mod.lora_a)), "||dW||^2", mod.name)
    inside = _finite(float(frob2(utb, mod.lora_a)), "||U^T dW||^2", mod.name)
    return ModuleRisk(
        risk=undone / mass if mass > 0 else 0.0,
        subspace_energy=min(1.0, inside / total) if total > 0 else 0.0,
        undone=undone,
        mass=mass,
    )


def reference_mass(reference: AlignmentReference) -> float:
    """``sum_j s_j^2`` over every module of the reference (the pooled score's fixed denominator)."""
    return float(sum(float((sub.s**2).sum()) for sub in reference.modules.values()))


def score_adapter(
    adapter: LoRAAdapter,
    reference: AlignmentReference,
    reuse: RiskReport | None = None,
    reuse_of: LoRAAdapter | None = None,
) -> RiskReport:
    """Risk of every module the reference covers, the worst module and the pooled score.

    ``reuse`` / ``reuse_of``: a report of another adapter; a module that is the *same object* in both
    adapters keeps its risk from it (admission re-scores a repaired adapter whose method kept modules).

    Raises:
        AdapterValidationError: a risk term is not finite.
    """
    report = RiskReport(score=0.0)
    undone = 0.0
    for name, mod in adapter.modules.items():
        sub = reference.modules.get(name)
        if sub is None:
            report.unmatched.append(name)
            continue
        same = reuse is not None and reuse_of is not None and reuse_of.modules.get(name) is mod
        r = (
            reuse.modules[name]
            if same and reuse is not None and name in reuse.modules
            else module_risk(mod, sub)
        )
        report.modules[name] = r
        undone += r.undone
        if report.worst_module is None or r.risk > report.score:
            report.score, report.worst_module = r.risk, name
    total_mass = reference_mass(reference)
    report.pooled = _finite(undone / total_mass if total_mass > 0 else 0.0, "pooled risk", "<adapter>")
    return report
