"""SafeLoRA (Hsu et al., 2024), the paper's operator as its official code applies it (IBM/SafeLoRA,
``model.py``: ``get_aligned_matrix``, ``projected_weighted``; defaults from ``config.py``).

Semantics (per module with alignment delta ``V = W_aligned - W_base``, LoRA factors ``B``, ``A``)::

    C = V @ V.T / ||V||_F                        # get_aligned_matrix; not a projector (C @ C != C)
    cos = round(cosine(vec(C @ B @ A), vec(B @ A)), 5)
    mode "number" (official default): thr = sorted(cos)[num_proj_layers - 1]
    mode "threshold":                 thr = threshold (official default 0.5)
    for every module with cos <= thr:  B <- C @ B       # rank unchanged, A and the scaling kept

Computed in low-rank form from the reference's SVD ``V = U diag(S) Vh``: ``C B = U (S^2 * (U^T B)) /
||V||_F``, and with ``A^T = Q R`` the cosine's terms are sums of squares of ``M = U^T B R^T``
(``k x r``)::

    <C B A, B A> = sum(S^2 M^2) / ||V||_F
    ||C B A||^2  = sum(S^4 M^2) / ||V||_F^2,     ||B A||^2 = ||B R^T||^2

so the ``out x out`` matrix ``C`` is never formed. With a reference that keeps every singular direction
(``energy 1.0``, ``max_rank >= min(out, in)``) this is the paper's operator exactly (to float rounding;
the test compares it with a dense transcription of the official code). With a truncated reference it
uses ``C_k = U_k S_k^2 U_k^T / ||V||_F`` (the norm of the full delta); the report's notes give the
relative error ``||C - C_k||_F / ||C||_F`` the reference recorded at build time.

Modules the reference does not hold (identical aligned and base weights, ``V = 0``) are kept: the
official code's ``C`` is ``0 / 0`` there and ``NaN <= thr`` never selects them. A module whose ``B A``
(or ``C B A``) is zero has cosine 0, as torch's eps-clamped ``cosine_similarity`` gives, and is selected.
"""

from __future__ import annotations

from typing import Literal

import numpy
import torch
from pydantic import BaseModel, Field

from ..core.adapter import LoRAAdapter, LoRAModule
from ..core.reference import AlignmentReference, ModuleSubspace
from .base import Method, MethodOutput, project_modules


class Options(BaseModel, extra="forbid"):
    select_layers_type: Literal["number", "threshold"] = Field(
        "number",
        description="How modules are chosen (official names): 'number' projects the num_proj_layers least "
        "similar modules (ties at the cut included), 'threshold' every module with cosine <= threshold.",
    )
    num_proj_layers: int = Field(
        10, ge=1, description="Modules projected in 'number' mode (official default 10)."
    )
    threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Cosine at or below which a module is projected in 'threshold' mode."
    )


def aligned_product(sub: ModuleSubspace, b: torch.Tensor) -> torch.Tensor:
    """``C @ B = U (S^2 * (U^T B)) / ||V||_F`` in float64: ``[out, r]``."""
    u = sub.u.double()
    return u @ ((sub.s.double() ** 2)[:, None] * (u.T @ b.double())) / sub.delta_norm


def cosine(sub: ModuleSubspace, mod: LoRAModule) -> float:
    """``cosine(vec(C B A), vec(B A))``, rounded to 5 places as the official code.

    With ``A^T = Q R`` (``Q`` orthonormal) every norm of ``X A`` is that of ``X R^T``, so with
    ``P = B R^T`` and ``M = U^T P`` (``r x r`` and ``k x r``, float64): ``<C B A, B A> = sum(s^2 M^2) /
    ||V||``, ``||C B A||^2 = sum(s^4 M^2) / ||V||^2``, ``||B A||^2 = ||P||^2``. All three are sums of
    squares: Gram products ``sum((M^T S^2 M) * (A A^T))`` cancel catastrophically on an update whose
    rank components cancel (large factors, ``B A ~ 0``) and gave cosines above 1."""
    r_t = torch.linalg.qr(mod.lora_a.double().T, mode="r")[1].T  # [r, r]
    p = mod.lora_b.double() @ r_t  # [out, r]
    m2 = (sub.u.double().T @ p) ** 2  # [k, r]
    s2 = sub.s.double() ** 2
    norm = sub.delta_norm
    inner = float((s2[:, None] * m2).sum()) / norm
    projected2 = float(((s2**2)[:, None] * m2).sum()) / norm**2
    total2 = float((p**2).sum())
    if not (projected2 > 0.0 and total2 > 0.0):
        # torch's cosine_similarity (eps-clamped norms) of a zero vector is 0: the official code ranks
        # such a module as least similar and projects it (harmless: C B A = 0 or B A = 0 already).
        return 0.0
    return float(numpy.round(inner / (projected2 * total2) ** 0.5, 5))


def repair_modules(
    adapter: LoRAAdapter, reference: AlignmentReference, opts: Options, *, max_rank=None
) -> MethodOutput:
    sims: dict[str, float] = {
        name: cosine(reference.modules[name], mod)
        for name, mod in adapter.modules.items()
        if name in reference.modules
    }
    if opts.select_layers_type == "threshold":
        thr = opts.threshold
    else:
        ordered = numpy.sort(numpy.array(list(sims.values()), dtype=numpy.float64))
        thr = float(ordered[: opts.num_proj_layers][-1]) if ordered.size else float("nan")
    chosen = {n for n, c in sims.items() if c <= thr}
    modules, reports = project_modules(
        adapter,
        chosen,
        sims,
        lambda name, b: aligned_product(reference.modules[name], b).to(b.dtype),
    )
    notes = [f"projected {len(chosen)} of {len(sims)} matched modules (cosine <= {thr:.5f})"]
    errors = [
        e
        for name in chosen
        if (meta := reference.manifest.modules.get(name)) is not None and (e := meta.gram_error) is not None
    ]
    if errors and max(errors) > 0.0:
        notes.append(
            f"truncated reference: ||C - C_k||_F / ||C||_F up to {max(errors):.3g} "
            f"(mean {sum(errors) / len(errors):.3g}) over the projected modules"
        )
    return MethodOutput(modules, reports, notes, {"threshold_used": thr, "projected": len(chosen)})


METHOD = Method("safelora", Options, repair_modules)
