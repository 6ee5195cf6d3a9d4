"""Routing headroom: how much a router could gain by mixing the experts differently per layer.

The router outputs one mixture per (adapter, layer). Whether per-layer routing can matter is a
property of the training pairs, not of the router: if the best mixture is about the same in every
layer, a router that learns a constant is right. Measured out of fold (each pair's expert outputs
come from experts trained on the OTHER pairs, as an adapter's are at repair time), for two experts::

    g_w        = (1 - w) g_0 + w g_1                          # w = weight of expert 1, on a grid
    loss_m(g)  = sum_j e_j (g_j - g*_j)^2 + risk_weight * sum_j sv_j^2 e_j max(1 - g_j, 0)^2
    constant   = min_w  mean_m loss_m(g_w)                    # one mixture everywhere
    oracle     = sum_slots min_w sum_{m in slot} loss_m(g_w) / M   # best mixture per (pair, layer)
    headroom   = 1 - oracle / constant

``loss_m`` is the router's training loss per module (``train.router_loss_per_module``). ``oracle``
picks each slot's mixture in hindsight, so ``headroom`` bounds what any per-layer router could gain over a constant.
"""

from __future__ import annotations

from typing import Any

import torch

from .model import Translator, TranslatorConfig
from .train import PairDataset, router_loss_per_module, train_translator


def subset(data: PairDataset, mask: torch.Tensor) -> PairDataset:
    """The modules of ``data`` where ``mask`` [M] is true (routing slots renumbered)."""
    _, slots = torch.unique(data.group[mask], return_inverse=True)
    names = [n for n, keep in zip(data.names, mask.tolist(), strict=True) if keep]
    return PairDataset(
        data.feats[mask],
        data.energy[mask],
        data.sv[mask],
        data.g_star[mask],
        slots,
        data.pair[mask],
        data.basis,
        names,
    )


def out_of_fold_outputs(data: PairDataset, config: TranslatorConfig, **train_kw: Any) -> torch.Tensor:
    """``[E, M, k]`` expert shrinks where each pair's rows come from experts trained without that pair.

    ``train_kw`` go to :func:`train_translator` (its router is not trained here).
    """
    pairs = torch.unique(data.pair)
    if len(pairs) < 2:
        raise ValueError(f"out-of-fold outputs need >= 2 pairs, got {len(pairs)}")
    out = torch.zeros(len(config.experts), len(data), config.k)
    for p in pairs.tolist():
        held = data.pair == p
        model, _ = train_translator(subset(data, ~held), config, router_steps=0, progress=False, **train_kw)
        with torch.no_grad():
            out[:, held] = model.expert_outputs(data.feats[held])
    return out


def mixing_headroom(
    data: PairDataset,
    outputs: torch.Tensor,
    risk_weight: float,
    *,
    router: Translator | None = None,
    grid: int = 101,
) -> dict[str, Any]:
    """Best constant mixture, per-slot oracle and (given ``router``) the learned router, on ``outputs``
    (``[2, M, k]`` expert shrinks, e.g. :func:`out_of_fold_outputs`)."""
    if outputs.shape[0] != 2 or outputs.shape[1:] != data.g_star.shape:
        raise ValueError(
            f"outputs must be [2, M, k] = [2, {list(data.g_star.shape)}], got {list(outputs.shape)}"
        )
    n = len(data)
    w = torch.linspace(0.0, 1.0, grid)
    g = (1 - w)[:, None, None] * outputs[0] + w[:, None, None] * outputs[1]  # [W, M, k]
    per = router_loss_per_module(g, data, risk_weight)  # [W, M]
    total = per.sum(1) / n
    best = int(total.argmin())
    n_slots = int(data.group.max()) + 1
    by_slot = torch.zeros(grid, n_slots).index_add_(1, data.group, per)  # [W, S]
    slot_best = by_slot.argmin(0)  # [S]
    oracle = float(by_slot.min(0).values.sum()) / n
    result: dict[str, Any] = {
        "risk_weight": risk_weight,
        "modules": n,
        "slots": n_slots,
        "constant": {"w_expert1": float(w[best]), "loss": float(total[best])},
        "oracle": {
            "loss": oracle,
            "w_expert1_mean": float(w[slot_best].mean()),
            "w_expert1_std": float(w[slot_best].std()) if n_slots > 1 else 0.0,
        },
        "headroom": 1.0 - oracle / float(total[best]) if float(total[best]) > 0 else 0.0,
    }
    if router is not None:
        with torch.no_grad():
            _, weights = router.mix(data.feats, data.group, "moe")
            wr = weights[data.group]  # [M, 2]
            gr = wr[:, :1] * outputs[0] + wr[:, 1:] * outputs[1]
            result["learned"] = {
                "loss": float(router_loss_per_module(gr, data, risk_weight).mean()),
                "w_expert1_mean": float(weights[:, 1].mean()),
                "w_expert1_std": float(weights[:, 1].std()) if len(weights) > 1 else 0.0,
            }
    return result
