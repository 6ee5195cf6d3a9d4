"""Routing headroom of the lab's translator: ``python -m benchmarks.safety_lab.router_headroom``.

Reads a lab result (default ``benchmarks/results/safety_lab.json``: its translator pairs, config and
calibrated risk weight; the adapters must still be in the lab cache), rebuilds the translator's
training set exactly as the lab did, and measures on it, out of fold, how much per-layer routing could
gain over one constant mixture of the two experts (``vllm_safeguard/translator/headroom.py``), next
to what the trained router does. Only the translator's training pairs are used: no evaluation adapter
and no generation. Writes ``translator_router_headroom.{json,md}`` beside the input (~15 s on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks.safety_lab.config import CONFIG, LabConfig
from benchmarks.safety_lab.translator_cal import train_quietly, translator_pairs

RESULTS = Path(__file__).resolve().parents[1] / "results" / "safety_lab.json"


def lab_config(meta_config: dict[str, Any]) -> LabConfig:
    """The lab config with the translator fields of the run that wrote ``meta_config``."""
    fields = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in meta_config.items()
        if k.startswith("translator_")
    }
    return dataclasses.replace(CONFIG, **fields)


def measure(result: dict[str, Any]) -> dict[str, Any]:
    from vllm_safeguard.adapter_io import load_adapter
    from vllm_safeguard.translator import build_dataset
    from vllm_safeguard.translator.headroom import mixing_headroom, out_of_fold_outputs

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
        "best constant w (vllm_safeguard/translator/headroom.py).",
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
