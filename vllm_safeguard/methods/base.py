"""What a repair method is: a self-describing unit the pipeline, config, cache key and CLI loop over.

A method is its options model (a pydantic model whose fields carry help text), the per-model
artifacts it needs (:class:`~vllm_safeguard.core.artifacts.ArtifactKind`: how each is located, loaded
and hashed into the cache key) and a ``run`` function::

    run(adapter, reference, options, *, max_rank, **{kind.name: artifact for kind in artifacts})
        -> MethodOutput

so a method's signature names the artifacts it receives (``safety_adapter=``, ``translator=``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from ..core.adapter import LoRAAdapter, LoRAModule, layer_index
from ..core.artifacts import ArtifactKind
from ..core.reference import AlignmentReference
from ..core.report import ModuleReport, RepairReport


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
    """One repair method (see the module docstring)."""

    name: str
    options: type[BaseModel]
    run: Callable[..., MethodOutput]
    artifacts: tuple[ArtifactKind, ...] = ()
    #: What the method needs of the reference beyond its SVD: ``None`` if this one will do, else the
    #: problem (checked when the plugin starts and before every repair).
    reference_problem: Callable[[AlignmentReference], str | None] | None = None


def project_modules(
    adapter: LoRAAdapter,
    chosen: set[str],
    sims: dict[str, float],
    project_b: Callable[[str, torch.Tensor], torch.Tensor],
) -> tuple[dict[str, LoRAModule], list[ModuleReport]]:
    """SafeLoRA's step shared by the paper operator and its variant: ``B <- project_b(name, B)`` for
    the ``chosen`` modules (A, scaling and rank kept), the rest kept; one report per module in ``sims``."""
    modules: dict[str, LoRAModule] = {}
    reports: list[ModuleReport] = []
    for name, mod in adapter.modules.items():
        if name in chosen:
            new, action = (
                LoRAModule(name, mod.lora_a.clone(), project_b(name, mod.lora_b), mod.scaling),
                "projected",
            )
        else:
            new, action = mod, "kept"
        modules[name] = new
        if name in sims:
            reports.append(
                ModuleReport(
                    module=name,
                    layer=layer_index(name),
                    similarity=sims[name],
                    action=action,
                    rank_in=mod.rank,
                    rank_out=new.rank,
                )
            )
    return modules, reports
