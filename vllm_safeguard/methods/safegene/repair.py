"""SafeGene repair: add the reusable safety adapter, per-layer coefficients, to a task adapter.

Semantics (per module ``m`` in a selected layer ``l`` of the safety adapter)::

    dW'_m = dW_task_m + c_l * B_s A_s
    B', A' = [s_t B_t | c_l B_s], [A_t ; A_s]     # rank r_t + r_s; re-factorized only above max_rank

Modules the safety adapter covers but the task adapter does not get the safety delta alone
(action ``safety_added``), so the delta applies to every token the adapter serves. Coefficients come
from ``options.coefficients`` (e.g. fitted by :func:`vllm_safeguard.methods.safegene.recalibrate`) or default
to ``default_coefficient``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from ...core.adapter import LoRAAdapter, LoRAModule, layer_index
from ...core.lowrank import bound_rank
from ...core.reference import AlignmentReference
from ...core.report import ModuleReport
from ...errors import RepairError
from ..base import MethodOutput


class Options(BaseModel, extra="forbid"):
    coefficients: dict[int, float] = Field(
        default_factory=dict,
        description="Per-layer coefficient c_l "
        "(from few-shot recalibration); layers not listed use the default.",
    )
    default_coefficient: float = Field(
        1.0, ge=0.0, le=10.0, description="c_l for layers without a fitted value."
    )
    default_max_rank: int = Field(
        64, ge=1, description="Rank bound of the output when the caller gives none."
    )


def repair_modules(
    adapter: LoRAAdapter, reference: AlignmentReference, opts: Options, *, max_rank=None, safety_adapter=None
) -> MethodOutput:
    safety = safety_adapter
    if safety is None:
        raise RepairError("safegene needs a safety adapter")
    bound = max_rank or opts.default_max_rank
    modules: dict[str, LoRAModule] = {}
    reports: list[ModuleReport] = []
    names = sorted(set(adapter.modules) | {n for n in safety.adapter.modules if safety.module(n) is not None})
    for name in names:
        task = adapter.modules.get(name)
        s = safety.module(name)
        layer = layer_index(name)
        if s is None:
            assert task is not None
            modules[name] = task
            reports.append(
                ModuleReport(module=name, layer=layer, action="kept", rank_in=task.rank, rank_out=task.rank)
            )
            continue
        c = (
            opts.coefficients.get(layer, opts.default_coefficient)
            if layer is not None
            else opts.default_coefficient
        )
        if task is None:
            b_cat, a_cat, rank_in = c * s.scaled_b(), s.lora_a, 0
        else:
            if (task.out_features, task.in_features) != (s.out_features, s.in_features):
                raise RepairError(f"{name}: safety adapter shape does not match the task adapter")
            b_cat = torch.cat([task.scaled_b(), c * s.scaled_b()], 1)
            a_cat = torch.cat([task.lora_a, s.lora_a], 0)
            rank_in = task.rank
        b2, a2, kept = bound_rank(b_cat, a_cat, bound)
        modules[name] = LoRAModule(name, a2, b2, 1.0)
        reports.append(
            ModuleReport(
                module=name,
                layer=layer,
                action="safety_added" if c != 0 else "kept",
                rank_in=rank_in,
                rank_out=b2.shape[1],
                energy_kept=kept,
                extra={"coefficient": float(c)},
            )
        )
    notes = [f"safety adapter rank {safety.manifest.rank} on layers {sorted(safety.layers)}"]
    return MethodOutput(modules, reports, notes)
