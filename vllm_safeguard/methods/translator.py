"""NeWTral repair: a trained translator maps each module's alignment coordinates to a safe version.

Semantics: see :mod:`vllm_safeguard.translator.model` (per-layer mixture of expert edits) and
:mod:`vllm_safeguard.translator.representation` (``dW' = dW + U dC Vh - g U R_left``). Modules the
reference does not cover pass through unchanged. The per-layer routing weights and shrink go into
each module report's ``extra`` (``w_<expert>``, ``shrink``); the dominant expert (largest mean
weight over layers) into ``RepairReport.summary``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from ..adapter import LoRAAdapter, LoRAModule, layer_index
from ..errors import RepairError
from ..reference import AlignmentReference
from ..report import ModuleReport
from . import MethodOutput


class Options(BaseModel, extra="forbid"):
    mode: Literal["moe", "surgical", "aggressive"] = Field(
        "moe", description="'moe': router mixes experts per layer; or one expert alone."
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
    safety=None,
    translator=None,
) -> MethodOutput:
    from ..translator.representation import apply_edit, view_module
    from ..translator.train import n_layers_of

    if translator is None:
        raise RepairError("method 'translator' needs a trained translator artifact (none configured)")
    bound = max_rank or opts.default_max_rank
    k = translator.config.k
    n_layers = n_layers_of(reference)
    names = [n for n in adapter.modules if n in reference.modules]
    views = [view_module(adapter.modules[n], reference.modules[n], k, n_layers) for n in names]
    layers = [layer_index(n) or 0 for n in names]
    uniq = sorted(set(layers))
    slot = torch.tensor([uniq.index(x) for x in layers])
    with torch.no_grad():
        dc, g, weights = translator.mix(torch.stack([v.features() for v in views]), slot, opts.mode)
    modules: dict[str, LoRAModule] = dict(adapter.modules)
    reports: list[ModuleReport] = []
    kinds = translator.config.experts
    for i, name in enumerate(names):
        mod, view = adapter.modules[name], views[i]
        new, kept = apply_edit(mod, reference.modules[name], k, dc[i] * view.scale, float(g[i]), bound)
        modules[name] = new
        extra = {f"w_{kind}": float(weights[slot[i], e]) for e, kind in enumerate(kinds)}
        extra["shrink"] = float(g[i])
        extra["edit_norm"] = float(dc[i].norm())
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
        f"translator mode {opts.mode}; mean routing weights "
        + ", ".join(f"{k_}={float(w):.3f}" for k_, w in zip(kinds, mean_w, strict=True))
    ]
    return MethodOutput(modules, reports, notes, summary={"dominant_expert": dominant})
