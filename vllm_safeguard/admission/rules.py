"""Admission decision rules: from a validated adapter to the canonical adapter vLLM will serve.

Plain Python (no vLLM import). :class:`~vllm_safeguard.admission.pipeline.SafeguardPipeline` runs it on the
staged copy of an adapter; ``vllm-safeguard admit`` runs the same pipeline as a dry run.

Semantics (every "refuse" raises; nothing is served that these rules did not pass)::

    c = canonicalize(adapter, served_dtype)        # scaling folded, SVD factors, rounded to the served dtype
    for m in c: kind(m) not in vLLM's LoRA modules -> refuse invalid     (vLLM would refuse it late)
    uncovered = [m in c if m not in reference and m matches no coverage_allow glob]
    uncovered and coverage == "refuse"             -> refuse uncovered   (names the modules)
    uncovered and coverage == "strip"              -> drop them (reported as stripped)
    for m in c: ||B A||_F > max_update_ratio * ||W_m||_F (or not finite) -> refuse invalid
    risk = score(c)                                # worst module; non-finite -> refuse invalid
    limit = min(threshold if threshold > 0 else inf, max_served_risk or inf)   # no served risk >= limit
    if risk < threshold and risk < limit: decision "passed", served = c    # the method never runs
    else:
        served = canonicalize(repair(c, risk))     # the method, on the canonical adapter, given the risk
                                                   # scored above (never scored twice; a failing
                                                   # method -> refuse unrepairable: the decision is made)
        factors of served not finite in the served dtype, or over the bound -> refuse invalid
        after = score(served)
        after >= limit, served ~= c (same_update)  -> refuse unrepairable ("left the update unchanged")
        after >= limit                             -> refuse unrepairable ("still at or above")
        after > risk (beyond float noise)          -> refuse unrepairable ("raised the risk")
        decision "repaired" if served != c else "passed" (the method judged it harmless, below limit)

So "high risk, nothing changed" is never a pass: with ``risk_threshold`` 0 (repair everything) the
limit is ``max_served_risk`` (default 0.5: half of some module's alignment delta undone).
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.adapter import LoRAAdapter, module_kind
from ..core.reference import AlignmentReference
from ..core.risk import RiskReport, score_adapter
from ..errors import AdapterValidationError, CoverageError, UnrepairableError
from .canonical import canonicalize, check_served_dtype, same_update, update_norm

# Part of every cache key: bump it whenever a rule or the canonical form changes what is served, so no
# entry decided by older rules is ever handed out as a hit.
ADMISSION_VERSION = 2

# Relative slack when comparing the risk before and after a repair (fp32 rounding of the same value).
_RISK_RTOL = 1e-4
_RISK_ATOL = 1e-6  # near zero, fp32 noise of the scoring maths is ~1e-7 (review finding: 9.9e-8 vs 1.75e-7)


@dataclass(frozen=True)
class AdmissionRules:
    """The config fields the decision reads (see :class:`~vllm_safeguard.config.SafeguardConfig`)."""

    risk_threshold: float = 0.0
    coverage: str = "refuse"
    coverage_allow: tuple[str, ...] = ()
    max_update_ratio: float | None = 100.0
    max_served_risk: float | None = 0.5

    @property
    def limit(self) -> float:
        """No adapter is served at or above this risk."""
        t = self.risk_threshold if self.risk_threshold > 0 else math.inf
        return min(t, self.max_served_risk if self.max_served_risk is not None else math.inf)


@dataclass
class Admission:
    """What admission decided. ``served`` is exactly what vLLM will read (see vllm_safeguard.admission.canonical)."""

    decision: str  # "passed" | "repaired"
    served: LoRAAdapter
    scored: LoRAAdapter  # the canonical input that was scored
    risk: RiskReport
    risk_after: float | None = None
    report: Any = None  # RepairReport of the method, when it ran
    stripped: list[str] = field(default_factory=list)
    allowed_uncovered: list[str] = field(default_factory=list)
    # Seconds per stage: "score" (canonical form, checks, risk), "repair" (the method), "verify" (the
    # repaired adapter's checks and risk); the pipeline adds "validate" and "write".
    times: dict[str, float] = field(default_factory=dict)


def _is_embedding(name: str) -> bool:
    return module_kind(name) in ("embed_tokens", "wte", "word_embeddings", "embed_in")


def _allowed(name: str, allow: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in allow)


def check_expected_modules(adapter: LoRAAdapter, expected: set[str] | None) -> None:
    """Refuse modules vLLM does not apply LoRA to for this model (it would refuse them after the repair)."""
    if expected is None:
        return
    bad = sorted(n for n in adapter.modules if module_kind(n) not in expected)
    if bad:
        raise AdapterValidationError(
            f"vLLM does not apply LoRA to module kind {module_kind(bad[0])!r} for this model "
            f"(it supports {sorted(expected)})",
            key=bad[0],
            value=bad[:5],
        )


def apply_coverage(
    adapter: LoRAAdapter, reference: AlignmentReference, rules: AdmissionRules
) -> tuple[LoRAAdapter, list[str], list[str]]:
    """``(adapter without stripped modules, stripped, allowed uncovered)`` or :class:`CoverageError`."""
    uncovered = sorted(n for n in adapter.modules if n not in reference.modules)
    # Embedding LoRAs have another layout in vLLM (A [r, vocab], B [hidden, r]) that this package does
    # not read: an allow-list cannot admit them (vLLM would fail applying them, in the engine step).
    allowed = [n for n in uncovered if _allowed(n, rules.coverage_allow) and not _is_embedding(n)]
    bad = [n for n in uncovered if n not in allowed]
    if not bad:
        return adapter, [], allowed
    if rules.coverage != "strip" and _is_embedding(bad[0]):
        raise CoverageError(
            f"module {bad[0]!r} is an embedding LoRA: the alignment reference does not cover it and vLLM "
            "reads embedding LoRAs in another layout, so it can be neither scored nor allowed; remove it"
        )
    if rules.coverage != "strip":
        raise CoverageError(
            f"module {bad[0]!r} is not covered by the alignment reference (nothing can score or repair it)"
            + (f", nor {len(bad) - 1} more: {bad[1:4]}" if len(bad) > 1 else "")
            + "; remove it from the adapter, or have the operator allow it (coverage_allow) or strip it "
            "(coverage='strip')"
        )
    kept = {n: m for n, m in adapter.modules.items() if n not in bad}
    if not kept:
        raise CoverageError(f"every module of the adapter is uncovered by the alignment reference: {bad[:4]}")
    return adapter.replace_modules(kept), bad, allowed


def check_update_bound(
    adapter: LoRAAdapter, base_norms: Mapping[str, float] | None, ratio: float | None
) -> None:
    """Refuse a module whose update norm is not finite, or over ``ratio * ||W||_F``."""
    for name, m in adapter.modules.items():
        norm = update_norm(m)
        if not math.isfinite(norm):
            raise AdapterValidationError(
                "update ||B A|| is not finite in fp32 (factors too large)",
                key=name,
                value=norm,
                has_value=True,
            )
        if ratio is None or base_norms is None or name not in base_norms:
            continue
        limit = ratio * base_norms[name]
        if norm > limit:
            raise AdapterValidationError(
                f"update ||B A||_F = {norm:.3g} is over {ratio:g} x the base weight's norm ({base_norms[name]:.3g})",
                key=name,
                value=norm,
                has_value=True,
            )


def admit(
    adapter: LoRAAdapter,
    reference: AlignmentReference,
    rules: AdmissionRules,
    repair: Callable[[LoRAAdapter, RiskReport], Any],
    *,
    base_norms: Mapping[str, float] | None = None,
    expected_modules: set[str] | None = None,
    served_dtype: torch.dtype | None = None,
) -> Admission:
    """Apply the rules in the module docstring. ``repair(adapter, risk) -> RepairResult`` runs the
    method on the canonical adapter, with the risk report admission computed for it.

    Raises:
        AdapterValidationError: (refused_invalid) non-finite or unbounded values, modules vLLM refuses.
        CoverageError: (refused_uncovered) a module nothing can score.
        UnrepairableError: (refused_unrepairable) at or above the threshold and not repaired below it.
    """
    t0 = time.perf_counter()
    c = canonicalize(adapter, served_dtype)
    check_expected_modules(c, expected_modules)
    c, stripped, allowed = apply_coverage(c, reference, rules)
    check_update_bound(c, base_norms, rules.max_update_ratio)
    if served_dtype is not None:
        check_served_dtype(c, served_dtype)
    risk = score_adapter(c, reference)
    limit = rules.limit
    t1 = time.perf_counter()
    times = {"score": t1 - t0}
    if risk.score < rules.risk_threshold and risk.score < limit:
        return Admission("passed", c, c, risk, None, None, stripped, allowed, times)
    try:
        result = repair(c, risk)
    except Exception as e:  # the decision "this needs a repair" is made: a failed repair is a refusal
        raise UnrepairableError(f"risk {risk.score:.3f} needs a repair and the repair failed: {e}") from e
    t2 = time.perf_counter()
    times["repair"] = t2 - t1
    served = canonicalize(result.adapter, served_dtype)
    check_expected_modules(served, expected_modules)
    if set(served.modules) - set(c.modules):
        raise UnrepairableError(
            f"the repair added modules the adapter did not have: {sorted(set(served.modules) - set(c.modules))[:4]}"
        )
    check_update_bound(served, base_norms, rules.max_update_ratio)
    if served_dtype is not None:
        check_served_dtype(served, served_dtype)
    unchanged = same_update(c, served)
    if unchanged:  # the method judged it harmless: serve exactly what was scored
        served = c
    after = score_adapter(served, reference, reuse=risk, reuse_of=c).score
    where = f"worst module {risk.worst_module!r}" if risk.worst_module else "no covered module"
    if after >= limit:
        what = (
            "the repair method left the update unchanged"
            if unchanged
            else f"it is still {after:.3f} after the repair"
        )
        raise UnrepairableError(
            f"risk {risk.score:.3f} ({where}) is at or above the limit {limit:g} (risk_threshold "
            f"{rules.risk_threshold:g}, max_served_risk {rules.max_served_risk}) and {what}"
        )
    if after > risk.score * (1 + _RISK_RTOL) + _RISK_ATOL:
        raise UnrepairableError(f"the repair raised the risk from {risk.score:.3f} to {after:.3f}")
    decision = "passed" if unchanged else "repaired"
    times["verify"] = time.perf_counter() - t2
    return Admission(decision, served, c, risk, after, result.report, stripped, allowed, times)
