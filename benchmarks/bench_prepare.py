"""`vllm-safeguard prepare` on the lab's model: time per stage, and the artifacts' quality next to the lab's.

    python benchmarks/bench_prepare.py [--model ALIGNED] [--base BASE] [--manifest PATH]

Default model: the demo's aligned SmolLM2 (``<cache root>/demo/aligned``, the lab recipe,
:mod:`vllm_safeguard.prepare.align`), base: the shipped SmolLM2. Without ``--manifest`` prepare runs
from an empty artifacts folder (every stage timed); with it, an earlier run's manifest is read (e.g.
the one ``make demo`` wrote). Compared with ``benchmarks/results/safety_lab.json`` (the lab's own
guard and calibration): guard layer, held-out AUROC / TPR / FPR, alpha_high and its few-shot ASR.
"Within noise": |AUROC difference| <= 0.02 and the same alpha_high.
Writes ``benchmarks/results/bench_prepare.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run_prepare(model: Path, base: Path, out: Path) -> tuple[dict[str, Any], float]:
    from vllm_safeguard.prepare.inputs import load_inputs
    from vllm_safeguard.prepare.options import PrepareOptions
    from vllm_safeguard.prepare.plan import make_plan
    from vllm_safeguard.prepare.run import run_plan

    t0 = time.time()
    opts = PrepareOptions()
    plan = make_plan(model, base, out, opts, load_inputs(opts))
    print(plan.describe(), flush=True)
    manifest = run_plan(plan)
    return manifest, time.time() - t0


def compare(manifest: dict[str, Any], lab: dict[str, Any]) -> dict[str, Any]:
    g, lg = manifest["quality"]["guard"], lab["meta"]["guard"]
    c, lc = manifest["quality"]["alpha_calibration"], lab["meta"]["alpha_calibration"]
    auroc, lab_auroc = (
        g["heldout"]["auroc_harmful_vs_benign_and_domain"],
        lg["test"]["auroc_harmful_vs_benign_and_domain"],
    )
    rows = {
        "guard layer": (g["layer"], lg["layer"]),
        "guard threshold": (round(g["threshold"], 4), round(lg["threshold"], 4)),
        "held-out AUROC (harmful vs benign + domain)": (auroc, lab_auroc),
        "held-out TPR at threshold": (g["heldout"]["tpr_at_threshold"], lg["test"]["tpr_at_threshold"]),
        "benign FPR at threshold": (
            g["heldout"]["fpr_benign_at_threshold"],
            lg["test"]["fpr_benign_at_threshold"],
        ),
        "alpha_high": (c["alpha_high"], lc["alpha_high"]),
        "few-shot ASR by alpha": (c["fewshot_asr_by_alpha"], lc["fewshot_asr_by_alpha"]),
    }
    within = abs(auroc - lab_auroc) <= 0.02 and c["alpha_high"] == lc["alpha_high"]
    return {"rows": {k: {"prepare": a, "lab": b} for k, (a, b) in rows.items()}, "within_noise": within}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# bench_prepare: `vllm-safeguard prepare` on the lab's model",
        "",
        f"Model {result['model']} (weights sha256 {result['weights_sha256'][:16]}...), base {result['base']}; "
        f"{result['machine']}. Source: {result['source']}.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in result["timings_s"].items()),
        f"| **total** | **{sum(result['timings_s'].values()):.0f}** |",
        "",
        "| quality | prepare | lab (`benchmarks/results/safety_lab.json`) |",
        "|---|---|---|",
        *(f"| {k} | {v['prepare']} | {v['lab']} |" for k, v in result["comparison"]["rows"].items()),
        "",
        f"Within noise (|AUROC difference| <= 0.02 and the same alpha_high): "
        f"**{'yes' if result['comparison']['within_noise'] else 'NO'}**.",
        "",
        "The lab calibrates alpha_high through vLLM's LoRA path with the plugin; prepare merges the same "
        "update into the weights in transformers (no vLLM needed): the two differ by float rounding only.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from vllm_safeguard.config import default_cache_root
    from vllm_safeguard.prepare.model_source import base_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument(
        "--manifest", type=Path, default=None, help="read this prepare manifest instead of running"
    )
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    model = args.model or default_cache_root() / "demo" / "aligned"
    if args.manifest:
        manifest, source = json.loads(args.manifest.read_text()), f"manifest {args.manifest}"
    else:
        if not (model / "config.json").is_file():
            print(f"no model at {model}: run `make demo` first or pass --model", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as out:
            manifest, wall = run_prepare(model, args.base or base_model_dir(), Path(out))
        source = f"fresh prepare run, {wall:.0f} s wall"
    lab = json.loads((RESULTS / "safety_lab.json").read_text())
    result = {
        "model": manifest["model"]["path"],
        "weights_sha256": manifest["model"]["weights_sha256"],
        "base": manifest["base"],
        "machine": f"{os.cpu_count()} CPU cores",
        "source": source,
        "timings_s": manifest["timings_s"],
        "comparison": compare(manifest, lab),
        "manifest": manifest,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "bench_prepare.json").write_text(json.dumps(result, indent=1))
    (args.results_dir / "bench_prepare.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
