"""Routing headroom of the lab's translator: ``python -m benchmarks.safety_lab.router_headroom``.

Reads a lab result (default ``benchmarks/results/safety_lab.json``: its translator pairs, config and
calibrated risk weight; the adapters must still be in the lab cache), rebuilds the translator's
training set exactly as the lab did, and measures on it, out of fold, how much per-layer routing could
gain over one constant mixture of the two experts (:func:`mixing_headroom`), next to what the
trained router does. Only the translator's training pairs are used: no evaluation adapter and no
generation. Writes ``translator_router_headroom.{json,md}`` beside the input (~15 s on 2 cores).

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

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.safety_lab.config import CONFIG, LabConfig
from benchmarks.safety_lab.translator_cal import train_quietly, translator_pairs
from vllm_safeguard.methods.translator.model import Translator, TranslatorConfig
from vllm_safeguard.methods.translator.train import PairDataset, router_loss_per_module, train_translator

RESULTS = Path(__file__).resolve().parents[1] / "results" / "safety_lab.json"


# ------------------------------------------------------------------------------- the measurement


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


# ---------------------------------------------------------------------------------- the lab's run


def lab_config(meta_config: dict[str, Any]) -> LabConfig:
    """The lab config with the translator fields of the run that wrote ``meta_config``."""
    fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in meta_config.items()
        if k.startswith("translator_")
    }
    return dataclasses.replace(CONFIG, **fields)


def measure(result: dict[str, Any]) -> dict[str, Any]:
    from vllm_safeguard.core.adapter_io import load_adapter
    from vllm_safeguard.methods.translator import build_dataset

    cfg, adapters = lab_config(result["meta"]["config"]), result["meta"]["adapters"]
    cal = result["meta"].get("translator_calibration") or {}
    chosen = float(cal.get("risk_weight", 1.0))
    pairs = translator_pairs(adapters)
    missing = [adapters[n]["path"] for p in pairs for n in p if not Path(adapters[n]["path"]).exists()]
    if missing:
        raise SystemExit(
            f"adapters of this lab result are not in the cache any more (run `make lab`): {missing}"
        )
    loaded = [(load_adapter(adapters[u]["path"]), load_adapter(adapters[s]["path"])) for u, s in pairs]
    tcfg = cfg.translator_config()
    data = build_dataset(loaded, tcfg.k, tcfg.g_max, cross_fit=cfg.translator_cross_fit)
    outputs = out_of_fold_outputs(data, tcfg, expert_steps=cfg.translator_expert_steps)
    rows = []
    for w in sorted({chosen, *cfg.translator_risk_sweep}):
        model = train_quietly(cfg, data, w)
        rows.append({"chosen": w == chosen, **mixing_headroom(data, outputs, w, router=model)})
    return {"pairs": pairs, "experts": tcfg.experts, "rows": rows}


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Translator: routing headroom (training pairs, out of fold)",
        "",
        f"Pairs: {', '.join(u for u, _ in out['pairs'])} ({out['rows'][0]['modules']} modules, "
        f"{out['rows'][0]['slots']} (pair, layer) routing slots). w = weight of the {out['experts'][1]} "
        "expert. Loss = the router's training loss (fidelity to the safe adapter + risk_weight x "
        "compliance energy left) on expert outputs from experts trained without the pair. Oracle = the "
        "best w per slot in hindsight: headroom is the most any per-layer router could gain over the "
        "best constant w (benchmarks/safety_lab/router_headroom.py).",
        "",
        "| risk weight | best constant w (loss) | per-slot oracle w mean +- sd (loss) | headroom "
        "| trained router w mean +- sd (loss) |",
        "|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        c, o, learned = r["constant"], r["oracle"], r["learned"]
        lines.append(
            f"| {r['risk_weight']:g}{' (chosen)' if r['chosen'] else ''} | {c['w_expert1']:.2f} ({c['loss']:.4f}) "
            f"| {o['w_expert1_mean']:.2f} +- {o['w_expert1_std']:.2f} ({o['loss']:.4f}) | {100 * r['headroom']:.1f}% "
            f"| {learned['w_expert1_mean']:.3f} +- {learned['w_expert1_std']:.3f} ({learned['loss']:.4f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="a safety_lab.json")
    args = ap.parse_args(argv)
    out = measure(json.loads(args.results.read_text()))
    md = markdown(out)
    print(md)
    (args.results.parent / "translator_router_headroom.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.results.parent / "translator_router_headroom.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
