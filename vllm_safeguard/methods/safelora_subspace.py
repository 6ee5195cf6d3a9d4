"""``safelora_subspace``: our variant of SafeLoRA (the paper's operator is :mod:`.safelora`).

Semantics (per module with alignment delta ``V ~= U S Vh``, adapter update ``dW = B A``)::

    P = U @ U.T                                  # exact orthogonal projector onto span(V)'s top-k
    sim = <P dW, dW> / (||P dW|| ||dW||)          # = ||U^T B A|| / ||B A||  (P is idempotent)
    if sim < threshold (or module among the top_k least similar):
        B <- U @ (U.T @ B)                        # dW <- P dW

Only the ``k x r`` product ``U^T B`` is formed; the ``out x out`` projector never is.
Departures from the paper (Hsu et al., 2024; official code IBM/SafeLoRA), which is why this is a
separately named variant and not "SafeLoRA":

* the operator is the orthogonal projector ``U U^T`` onto the energy-truncated top-k subspace, not
  ``C = V V^T / ||V||_F``. It is scale-free and idempotent, so an update already inside span(U) passes
  untouched at any scale, where the paper's operator shrinks each direction by ``s_i^2 / ||V||_F``;
* the similarity is the unweighted ``||U^T B A|| / ||B A||``, not the ``s_i^2``-weighted cosine;
* threshold mode (< 0.35) is the default; the official default selects the 10 least similar modules.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from ..core.adapter import LoRAAdapter, LoRAModule
from ..core.lowrank import frob2
from ..core.reference import AlignmentReference
from .base import Method, MethodOutput, project_modules


class Options(BaseModel, extra="forbid"):
    mode: Literal["threshold", "topk"] = Field(
        "threshold",
        description="'threshold': project modules with similarity < threshold; "
        "'topk': project the top_k least similar modules.",
    )
    threshold: float = Field(
        0.35,
        ge=0.0,
        le=1.0,
        description="Similarity below which a module is projected.",
    )
    top_k: int = Field(10, ge=0, description="Modules to project in 'topk' mode.")


def similarity(mod: LoRAModule, u) -> float:
    """``||U^T B A||_F / ||B A||_F`` — cosine between the projected and the original update."""
    total = float(frob2(mod.lora_b, mod.lora_a))
    if not total > 0.0:  # zero, or a Gram sum that rounded below zero (cancelling components)
        return 1.0
    inside = max(0.0, float(frob2(u.T @ mod.lora_b, mod.lora_a)))  # (negative)**0.5 would be complex
    return min(1.0, (inside / total) ** 0.5)


def repair_modules(
    adapter: LoRAAdapter, reference: AlignmentReference, opts: Options, *, max_rank=None
) -> MethodOutput:
    sims: dict[str, float] = {
        name: similarity(mod, reference.modules[name].u)
        for name, mod in adapter.modules.items()
        if name in reference.modules
    }
    if opts.mode == "threshold":
        chosen = {n for n, s in sims.items() if s < opts.threshold}
    else:
        chosen = set(sorted(sims, key=lambda n: sims[n])[: opts.top_k])

    def project_b(name: str, b: torch.Tensor) -> torch.Tensor:
        u = reference.modules[name].u
        return u @ (u.T @ b)

    modules, reports = project_modules(adapter, chosen, sims, project_b)
    notes = [f"projected {len(chosen)} of {len(sims)} matched modules"]
    return MethodOutput(modules, reports, notes)


METHOD = Method("safelora_subspace", Options, repair_modules)
