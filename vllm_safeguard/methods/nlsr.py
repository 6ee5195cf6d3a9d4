"""NLSR (Yi et al.), analogue of the official code (xinykou/NLSR @ aaee2b7) on a LoRA served on an
aligned model. Our data-free variant is :mod:`.nlsr_datafree`.

The official pipeline works on two LoRAs over the same SFT model: the alignment LoRA, extrapolated
(``expo-lora.py``: both factors x ``2 alpha``) into the super-aligned reference, and the fine-tuned
LoRA, whose factor entries correspond to the reference's (it continues from them). Here the
alignment is the full delta ``V = W_aligned - W_base`` and the adapter is trained from scratch on the
aligned model, so the analogue (1) writes the reference as a LoRA on the aligned model at the
adapter's rank ``r``: the super-aligned model ``W_base + (2 alpha)^2 V`` is ``W_aligned + c V`` with
``c = (2 alpha)^2 - 1`` (2.24 at alpha 0.9), and ``c V`` is cut to its top ``r`` directions in
balanced form; (2) puts the adapter in the same gauge (balanced SVD factors, column signs matched to
the reference's), so entry ``(i, j)`` means the same thing in both. The rest follows the official
code step by step.

Semantics (per module; ``U S Vh`` the reference's SVD of V, ``G = Vh (X^T X / n) Vh^T`` the input
Gram on safety samples' response tokens, from :mod:`vllm_safeguard.core.activations`)::

    B_ref, A_ref = sqrt(c) U_r S_r^(1/2),  sqrt(c) S_r^(1/2) Vh_r           # [out, r], [r, in]
    B, A         = balanced SVD factors of s B A, signs of B's columns matched to B_ref's
    # model_wrapper_low.py: project each reference factor on the top q = int(0.8 r) right singular
    # vectors of its output on the safety tokens (score = X W^T; lora_B's input is X A_ref^T)
    A_proj = P_A A_ref,  P_A = top-q eigenvectors of A_ref G' A_ref^T         # G' = X^T X / n
    B_proj = P_B B_ref,  P_B = top-q left singular vectors of B_ref (A_ref G' A_ref^T)^(1/2)
    # sparsity_ratio_low.py: per tensor, entries strictly above the 80th percentile of |W_proj|
    M_A = |A_proj| > sort(|A_proj|)[int(0.8 n)];  M_B likewise
    # inner.py: plain cosine of the masked updates, one per module
    cos = cosine(vec((M_B * B)(M_A * A)), vec((M_B * B_ref)(M_A * A_ref)))
    # Adaptive_Search_Operation: rank N+1 for the most similar module down to 2 for the least
    p = (prune_rate - eps) + 2 eps (rank - 2) / (N - 1);  torch.manual_seed(seed); bernoulli(p)
    # transplant, rank kept:
    A <- A * ~M_A + A_ref * M_A;   B <- B * ~M_B + B_ref * M_B

As in the official code the selection probability *rises* with similarity (0.7 for the most similar
module, 0.3 for the least), whatever the comment there says. Not reproduced: bf16 arithmetic (ties
in the ranking), the CUDA generator's draws, the sequential projection of earlier layers while
recording later ones, the model the activations come from (the official code records them on the
SFT model with the super-aligned LoRA on; ours on the aligned model, which the reference is built
from), and 2000 PKU-SafeRLHF samples (the reference records whatever samples its builder passes; the
lab uses its few-shot harmful prompts with refusals). When the reference keeps fewer directions than
the adapter's rank, its factors are zero-padded (the official reference LoRA has the full rank 128).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from ..core.adapter import LoRAAdapter, LoRAModule, layer_index
from ..core.lowrank import frob2, inner
from ..core.reference import AlignmentReference, ModuleSubspace
from ..core.report import ModuleReport
from .base import Method, MethodOutput

#: named_parameters() order of a Llama decoder layer: the order the official code ranks and draws in.
OFFICIAL_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Options(BaseModel, extra="forbid"):
    expo_alpha: float = Field(
        0.9,
        ge=0.5,
        le=5.0,
        description="ExPO strength as the official expo-lora.py applies it: both alignment-LoRA factors "
        "x 2*alpha, so the reference is W_aligned + ((2 alpha)^2 - 1) V (0.9: +2.24 V).",
    )
    sparsity_ratio: float = Field(
        0.8,
        gt=0.0,
        lt=1.0,
        description="Share of each factor's entries below the mask threshold (0.8: the top 20% are "
        "safety-critical); also the share of directions the activation-aware projection keeps.",
    )
    prune_rate: float = Field(0.5, ge=0.0, le=1.0, description="Mean selection probability (official 0.5).")
    epsilon: float = Field(
        0.2, ge=0.0, le=0.5, description="Half-width of the selection probabilities (official 0.2: 0.3-0.7)."
    )
    seed: int = Field(42, description="Seed of the selection draw (official 42).")


def _balanced(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U sqrt(S), sqrt(S) Vt)`` of ``b @ a`` at exactly ``b``'s rank (zero directions kept)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vt = torch.linalg.svd(rb @ ra.T)
    root = s.sqrt()
    return (qb @ u) * root, root[:, None] * (vt @ qa.T)


def reference_factors(sub: ModuleSubspace, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale * V`` cut to its top ``rank`` directions, balanced, zero-padded: ``[out, r], [r, in]``."""
    k = min(rank, sub.rank)
    root = (scale * sub.s[:k].double()).sqrt()
    b = torch.zeros(sub.u.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, sub.vh.shape[1], dtype=torch.float64)
    b[:, :k] = sub.u[:, :k].double() * root
    a[:k] = root[:, None] * sub.vh[:k].double()
    return b, a


def top_entries(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """``|w| > sort(|w|)[int(n * ratio)]`` (sparsity_ratio_low.py): the safety-critical entries."""
    metric = w.abs()
    values = torch.sort(metric.flatten()).values
    return metric > values[int(values.numel() * ratio)]


def safety_masks(
    sub: ModuleSubspace, b_ref: torch.Tensor, a_ref: torch.Tensor, ratio: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M_B, M_A)`` from the activation-aware projections of the reference factors
    (``b_ref, a_ref = reference_factors(sub, r, scale)``)."""
    assert sub.input_gram is not None
    r = a_ref.shape[0]
    k = min(r, sub.rank)
    gram = torch.zeros(r, r, dtype=torch.float64)  # Vh_r G' Vh_r^T, padded like the factors
    gram[:k, :k] = sub.input_gram[:k, :k].double()
    root = torch.zeros(r, dtype=torch.float64)  # A_ref = diag(root) Vh_r
    root[:k] = (scale * sub.s[:k].double()).sqrt()
    m_a = root[:, None] * gram * root[None, :]  # A_ref G' A_ref^T  [r, r]
    evals, evecs = torch.linalg.eigh(m_a)
    q_a = int(min(r, a_ref.shape[1]) * ratio)
    p_a = evecs.flip(1)[:, :q_a]  # top-q eigenvectors  [r, q]
    a_proj = p_a @ (p_a.T @ a_ref)
    half = evecs * evals.clamp_min(0.0).sqrt()  # M_A^(1/2) up to rotation: B_ref half half^T B_ref^T = M_B
    left = torch.linalg.svd(b_ref @ half, full_matrices=False)[0]  # [out, r], descending
    q_b = int(min(b_ref.shape[0], r) * ratio)
    p_b = left[:, :q_b]
    b_proj = p_b @ (p_b.T @ b_ref)
    return top_entries(b_proj, ratio), top_entries(a_proj, ratio)


def selection_probabilities(cos: torch.Tensor, prune_rate: float, epsilon: float) -> torch.Tensor:
    """Adaptive_Search_Operation: ranks N+1 (most similar) .. 2, min-max normalized, to [p-eps, p+eps]."""
    n = cos.numel()
    if n == 1:  # the official min-max is 0/0 here
        return torch.full_like(cos, prune_rate)
    ranking = torch.empty_like(cos)
    ranking[torch.argsort(cos, dim=0, descending=True)] = torch.arange(n + 1, 1, -1, dtype=cos.dtype)
    norm = (ranking - ranking.min()) / (ranking.max() - ranking.min())
    return ((prune_rate - epsilon) + norm * (2 * epsilon)).clip(0, 1)


def official_order(name: str) -> tuple[int, int, str]:
    kind = name.rsplit(".", 1)[-1]
    layer = layer_index(name)
    return (
        -1 if layer is None else layer,
        OFFICIAL_ORDER.index(kind) if kind in OFFICIAL_ORDER else 99,
        name,
    )


def reference_problem(reference: AlignmentReference) -> str | None:
    missing = [n for n, m in reference.modules.items() if m.input_gram is None]
    if not missing:
        return None
    return (
        f"method 'nlsr' scores weights on safety activations, and the reference has none for "
        f"{len(missing)} of {len(reference.modules)} modules (e.g. {missing[0]!r}); rebuild it with "
        "`vllm-safeguard reference build --safety-samples FILE` (or use 'nlsr_datafree')"
    )


def repair_modules(
    adapter: LoRAAdapter, reference: AlignmentReference, opts: Options, *, max_rank=None
) -> MethodOutput:
    names = sorted((n for n in adapter.modules if n in reference.modules), key=official_order)
    c = (2 * opts.expo_alpha) ** 2 - 1
    parts: dict[str, tuple[torch.Tensor, ...]] = {}
    cos: list[float] = []
    for name in names:
        mod, sub = adapter.modules[name], reference.modules[name]
        b_ref, a_ref = reference_factors(sub, mod.rank, c)
        b, a = _balanced(mod.scaled_b(), mod.lora_a)
        flip = torch.where((b * b_ref).sum(0) < 0, -1.0, 1.0).to(b.dtype)
        b, a = b * flip, flip[:, None] * a
        m_b, m_a = safety_masks(sub, b_ref, a_ref, opts.sparsity_ratio, c)
        bm, am, brm, arm = b * m_b, a * m_a, b_ref * m_b, a_ref * m_a
        den = float(frob2(bm, am) * frob2(brm, arm)) ** 0.5
        cos.append(float(inner(bm, am, brm, arm)) / den if den > 1e-30 else 0.0)
        parts[name] = (b, a, b_ref, a_ref, m_b, m_a)
    cos_t = torch.tensor(cos, dtype=torch.float32)
    probs = selection_probabilities(cos_t, opts.prune_rate, opts.epsilon) if names else cos_t
    drawn = torch.bernoulli(probs, generator=torch.Generator().manual_seed(opts.seed)) if names else probs
    modules = dict(adapter.modules)
    reports: list[ModuleReport] = []
    for i, name in enumerate(names):
        mod = adapter.modules[name]
        b, a, b_ref, a_ref, m_b, m_a = parts[name]
        chosen = bool(drawn[i] == 1)
        if chosen:
            a_new = torch.where(m_a, a_ref, a).float()
            b_new = torch.where(m_b, b_ref, b).float()
            modules[name] = LoRAModule(name, a_new, b_new, 1.0)
        reports.append(
            ModuleReport(
                module=name,
                layer=layer_index(name),
                similarity=cos[i],
                action="transplanted" if chosen else "kept",
                rank_in=mod.rank,
                rank_out=modules[name].rank,
                extra={
                    "probability": float(probs[i]),
                    "mask_a": float(m_a.float().mean()),
                    "mask_b": float(m_b.float().mean()),
                },
            )
        )
    done = sum(r.action == "transplanted" for r in reports)
    notes = [f"transplanted {done} of {len(names)} modules (seeded draw, p rising with similarity rank)"]
    return MethodOutput(modules, reports, notes, {"transplanted": done, "reference_scale": c})


METHOD = Method("nlsr", Options, repair_modules, reference_problem=reference_problem)
