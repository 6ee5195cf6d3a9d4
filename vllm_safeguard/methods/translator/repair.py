"""NeWTral repair: a trained translator shrinks each module's update along its learned basis.

Semantics: see :mod:`vllm_safeguard.methods.translator.model` (per-layer mixture of expert shrinks) and
:mod:`vllm_safeguard.methods.translator.representation` (``dW' = dW - U diag(g) U^T dW``, same rank). Modules
the translator has no basis for pass through unchanged. The per-layer routing weights and the mean
shrink go into each module report's ``extra`` (``w_<expert>``, ``shrink``); the dominant expert
(largest mean weight over layers) into ``RepairReport.summary``. The alignment reference is not read
(the translator carries its own basis); the plugin still checks that both name the same base model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from ...core.adapter import LoRAAdapter, LoRAModule, layer_index
from ...core.reference import AlignmentReference
from ...core.report import ModuleReport
from ...errors import RepairError
from ..base import MethodOutput


class Options(BaseModel, extra="forbid"):
    mode: Literal["moe", "surgical", "aggressive"] = Field(
        "moe", description="'moe': router mixes experts per layer; or one expert alone."
    )
    strength: float = Field(
        1.0,
        ge=0.0,
        le=4.0,
        description="Scales the translator's shrinks: dW' = dW - strength * U diag(g) U^T dW. 1 applies "
        "the translation as trained, 0 leaves the adapter unchanged; the lab sweeps it to trace each "
        "expert's ASR-fidelity curve.",
    )
    default_max_rank: int = Field(
        64, ge=1, description="Rank bound of the output when the caller gives none."
    )


def repair_modules(
    adapter: LoRAAdapter,
    reference: AlignmentReference,
    opts: Options,
    *,
    max_rank=None,
    translator=None,
) -> MethodOutput:
    from ...core.lowrank import bound_rank
    from .representation import apply_shrink, n_layers_of, view_module

    if translator is None:
        raise RepairError("method 'translator' needs a trained translator artifact (none configured)")
    bound = max_rank or opts.default_max_rank
    n_layers = n_layers_of(list(translator.basis))
    names = [n for n in adapter.modules if n in translator.basis]
    if not names:
        raise RepairError(
            "the translator has no basis for any module of this adapter "
            f"(adapter modules e.g. {sorted(adapter.modules)[:2]}, translator e.g. {sorted(translator.basis)[:2]})"
        )
    views = [view_module(adapter.modules[n], translator.basis[n], n_layers) for n in names]
    layers = [layer_index(n) or 0 for n in names]
    uniq = sorted(set(layers))
    slot = torch.tensor([uniq.index(x) for x in layers])
    with torch.no_grad():
        g, weights = translator.mix(torch.stack([v.features() for v in views]), slot, opts.mode)
        g = g * opts.strength
    modules: dict[str, LoRAModule] = dict(adapter.modules)
    reports: list[ModuleReport] = []
    kinds = translator.config.experts
    for i, name in enumerate(names):
        mod = adapter.modules[name]
        shrunk, ratio = apply_shrink(mod, translator.basis[name], g[i])
        b2, a2, kept = bound_rank(shrunk.lora_b, shrunk.lora_a, bound)  # same rank: only if over the bound
        new = LoRAModule(name, a2, b2, 1.0)
        modules[name] = new
        extra = {f"w_{kind}": float(weights[slot[i], e]) for e, kind in enumerate(kinds)}
        extra["shrink"] = float((views[i].energy * g[i]).sum())  # energy-weighted mean shrink
        extra["shrink_max"] = float(g[i].max())
        extra["update_energy_ratio"] = ratio  # ||dW'||^2 / ||dW||^2
        reports.append(
            ModuleReport(
                module=name,
                layer=layer_index(name),
                action="translated",
                rank_in=mod.rank,
                rank_out=new.rank,
                energy_kept=kept,
                extra=extra,
            )
        )
    mean_w = weights.mean(0)
    dominant = kinds[int(mean_w.argmax())] if opts.mode == "moe" else opts.mode
    notes = [
        f"translator mode {opts.mode}, strength {opts.strength:g}; mean routing weights "
        + ", ".join(f"{k_}={float(w):.3f}" for k_, w in zip(kinds, mean_w, strict=True))
    ]
    return MethodOutput(modules, reports, notes, summary={"dominant_expert": dominant})
