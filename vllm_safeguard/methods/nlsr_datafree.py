"""``nlsr_datafree``: our data-free variant inspired by NLSR (Yi et al.); the analogue of the paper's
method as its official code runs it is :mod:`.nlsr`.

Departures from the official code (xinykou/NLSR): the reference is ``W_aligned + beta V`` with beta 0.5
(official: factors x 1.8, i.e. ``+2.24 V``); safety-critical *output rows* scored from weights alone
(official: top 20% entries of each LoRA factor after an activation-aware projection on safety samples);
one pooled, magnitude-aware cosine per *layer* against a threshold (official: a plain cosine per module
and a seeded random selection by similarity rank); the transplant appends the reference's rows, so
the rank grows to ``r + k`` (official: masked entries replaced, rank kept).

Semantics (per module ``m`` with alignment delta ``V ~= U S Vh``; served model = aligned model; the
adapter's update ``dW = s B A`` is relative to it)::

    V_super  = (1 + beta) V                   # super-aligned reference: W_super = W_aligned + beta V
    score_i  = ||(U S)[i, :]||^2               # weight-based importance of output neuron i in V_super
    S_m      = top neuron_fraction rows by score  # safety-critical neurons ("safety region")
    # similarity of the safety region, patched model vs reference, measured from W_base so the
    # shared base weights cancel:  patched = V[S] + dW[S],  reference = V_super[S]
    P, R     = concat_m (V_m + dW_m)[S_m], concat_m V_m[S_m]      # per transformer layer l
    sim_l    = <P, R> / (||R|| max(||P||, ||R||))   # cosine, shrunk by lost magnitude
    degraded = {l : sim_l < similarity_threshold}   (or the top_k_layers least similar)
    for m in degraded layers:                    # transplant the reference's safety neurons
        dW'[S]  = beta V[S]        (= W_super - W_aligned on those rows)
        dW'[~S] = dW[~S]
        B', A'  = [(1 - E_S) s B | E_S beta U S], [A ; Vh]     # rank r + k; re-factorized only above max_rank

Everything is computed through the factors: row restrictions of ``B`` and ``U S``, r x k Gram
products. The output is again a LoRA (rank <= r + k, bounded by ``max_rank``; energy kept recorded).
Note: the similarity does not depend on beta (V_super is parallel to V); beta sets how far the
transplanted neurons are pushed past the aligned model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from pydantic import BaseModel, Field

from ..core.adapter import LoRAAdapter, LoRAModule, layer_index
from ..core.lowrank import bound_rank
from ..core.reference import AlignmentReference, ModuleSubspace
from ..core.report import ModuleReport
from .base import Method, MethodOutput


class Options(BaseModel, extra="forbid"):
    beta: float = Field(
        0.5,
        ge=0.0,
        le=10.0,
        description="Amplification of the alignment delta for the "
        "super-aligned reference (W_super = W_aligned + beta * V).",
    )
    neuron_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="Share of output neurons per module treated as safety-critical."
    )
    mode: Literal["threshold", "topk"] = Field("threshold", description="How degraded layers are chosen.")
    similarity_threshold: float = Field(
        0.9,
        ge=-1.0,
        le=1.0,
        description="Layers whose safety-region cosine is below this are patched ('threshold' mode).",
    )
    top_k_layers: int = Field(4, ge=0, description="Layers to patch in 'topk' mode (least similar first).")
    default_max_rank: int = Field(
        64, ge=1, description="Rank bound of the output when the caller gives none."
    )


def safety_neurons(sub: ModuleSubspace, fraction: float) -> torch.Tensor:
    """Indices of the ``fraction`` output neurons carrying most of the alignment delta's energy."""
    score = ((sub.u * sub.s) ** 2).sum(1)
    n = max(1, round(fraction * score.numel()))
    return torch.topk(score, n).indices.sort().values


def _region_terms(mod: LoRAModule, sub: ModuleSubspace, rows: torch.Tensor) -> tuple[float, float, float]:
    """``(<V[S], dW[S]>, ||V[S]||^2, ||dW[S]||^2)`` via factors (Vh has orthonormal rows)."""
    us = (sub.u * sub.s)[rows]  # [|S|, k]
    bs = mod.scaled_b()[rows]  # [|S|, r]
    av = mod.lora_a @ sub.vh.T  # [r, k]
    cross = float(((bs.T @ us) * av).sum())
    v2 = float((us**2).sum())
    d2 = float(((bs.T @ bs) * (mod.lora_a @ mod.lora_a.T)).sum())
    return cross, v2, d2


def repair_modules(
    adapter: LoRAAdapter, reference: AlignmentReference, opts: Options, *, max_rank=None
) -> MethodOutput:
    bound = max_rank or opts.default_max_rank
    rows: dict[str, torch.Tensor] = {}
    layer_terms: dict[int | None, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    module_sim: dict[str, float] = {}
    for name, mod in adapter.modules.items():
        sub = reference.modules.get(name)
        if sub is None:
            continue
        rows[name] = safety_neurons(sub, opts.neuron_fraction)
        cross, v2, d2 = _region_terms(mod, sub, rows[name])
        acc = layer_terms[layer_index(name)]
        acc[0], acc[1], acc[2] = acc[0] + cross, acc[1] + v2, acc[2] + d2
        module_sim[name] = _cos(cross, v2, d2)
    layer_sim = {layer: _cos(*t) for layer, t in layer_terms.items()}
    if opts.mode == "threshold":
        degraded = {layer for layer, s in layer_sim.items() if s < opts.similarity_threshold}
    else:
        degraded = set(sorted(layer_sim, key=lambda layer: layer_sim[layer])[: opts.top_k_layers])
    modules: dict[str, LoRAModule] = {}
    reports: list[ModuleReport] = []
    for name, mod in adapter.modules.items():
        layer = layer_index(name)
        if name not in rows:
            modules[name] = mod
            continue
        extra = {"layer_similarity": layer_sim[layer], "neurons": float(rows[name].numel())}
        if layer not in degraded:
            modules[name] = mod
            reports.append(
                ModuleReport(
                    module=name,
                    layer=layer,
                    similarity=module_sim[name],
                    action="kept",
                    rank_in=mod.rank,
                    rank_out=mod.rank,
                    extra=extra,
                )
            )
            continue
        sub = reference.modules[name]
        mask = torch.zeros(mod.out_features, 1)
        mask[rows[name]] = 1.0
        b_cat = torch.cat([(1.0 - mask) * mod.scaled_b(), mask * (opts.beta * sub.u * sub.s)], dim=1)
        a_cat = torch.cat([mod.lora_a, sub.vh], dim=0)
        b2, a2, kept = bound_rank(b_cat, a_cat, bound)
        modules[name] = LoRAModule(name, a2, b2, 1.0)
        reports.append(
            ModuleReport(
                module=name,
                layer=layer,
                similarity=module_sim[name],
                action="transplanted",
                rank_in=mod.rank,
                rank_out=b2.shape[1],
                energy_kept=kept,
                extra=extra,
            )
        )
    notes = [
        f"patched {len(degraded)} of {len(layer_sim)} layers: {sorted(x for x in degraded if x is not None)}"
    ]
    return MethodOutput(modules, reports, notes)


def _cos(cross: float, v2: float, d2: float) -> float:
    """Magnitude-aware cosine of ``P = V[S] + dW[S]`` against ``V[S]`` from the three Gram terms.

    ``<P, V> / (||V|| * max(||P||, ||V||))``: the plain cosine when the region kept at least its size,
    and the surviving share of the alignment delta when it shrank. A plain cosine would score an
    adapter that cancels 80% of V along V itself (``P = 0.2 V``) as perfectly similar.
    """
    p2 = max(v2 + 2 * cross + d2, 0.0)
    den = v2**0.5 * max(p2, v2) ** 0.5
    return (v2 + cross) / den if den > 0 else 1.0


METHOD = Method("nlsr_datafree", Options, repair_modules)
