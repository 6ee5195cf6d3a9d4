"""DSA guard quality on the lab's real model: AUROC and benign false-positive rate on held-out prompts.

Train: HarmBench behaviours of the lab's ``train`` split (harmful) vs the lab's benign ``train``
prompts plus domain-task training prompts. Validation (layer and threshold choice): a slice of the
training pools, so the test sets stay untouched. Test: HarmBench ``test`` split (never used for
training anything in the lab) vs benign ``test`` prompts (disjoint topics) plus domain-task test prompts.

Usage: python -m benchmarks.bench_guard [--model ALIGNED_DIR] [--out-probe DIR]
Writes benchmarks/results/bench_guard.json + .md and saves the probe (default: the lab cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.safety_lab.config import CONFIG
from benchmarks.safety_lab.extras import guard_sets
from benchmarks.safety_lab.run import build_data
from vllm_safeguard.guard.experiment import train_and_test
from vllm_safeguard.prepare.model_source import cache_dir

RESULTS = Path(__file__).resolve().parent / "results"


def newest_aligned() -> Path:
    found = sorted((cache_dir() / "lab" / "aligned").glob("*/artifact"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no aligned lab model in the cache: run `make lab` first (or pass --model)")
    return found[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", type=Path, default=None, help="Aligned model folder (default: newest lab build)."
    )
    ap.add_argument("--out-probe", type=Path, default=None, help="Where to save the probe.")
    ap.add_argument("--target-fpr", type=float, default=CONFIG.guard_target_fpr)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or newest_aligned()
    # The lab's own splits: the test sets are the prompts of the lab's table, never trained on.
    sets = guard_sets(CONFIG, build_data(CONFIG))
    probe, result = train_and_test(model_dir, **sets, target_fpr=args.target_fpr)  # type: ignore[arg-type]
    result = {"benchmark": "bench_guard", "model": str(model_dir), **result}
    out_probe = args.out_probe or (cache_dir() / "lab" / "guard")
    probe.save(out_probe)
    result["probe"] = str(out_probe)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_guard.json").write_text(json.dumps(result, indent=2))
    t = result["test"]
    md = [
        "# bench_guard: DSA guard probe on the lab model",
        "",
        f"Model: `{model_dir}`; probe on layer {result['layer']} (chosen by validation AUROC among "
        f"{len(result['layer_auroc_validation'])} layers), threshold {result['threshold']:.4f} "
        f"(validation FPR <= {args.target_fpr}).",
        "",
        "| held-out test | value |",
        "|---|---|",
        f"| AUROC harmful vs (benign + domain) | {t['auroc_harmful_vs_benign_and_domain']:.4f} (target >= 0.95) |",
        f"| AUROC harmful vs benign | {t['auroc_harmful_vs_benign']:.4f} |",
        f"| TPR (harmful flagged) at threshold | {t['tpr_at_threshold']:.3f} (n={t['n_harmful']}) |",
        f"| FPR benign at threshold | {t['fpr_benign_at_threshold']:.3f} (n={t['n_benign']}) |",
        f"| FPR domain tasks at threshold | {t['fpr_domain_at_threshold']:.3f} (n={t['n_domain']}) |",
        "",
        "Harmful test prompts are the lab's HarmBench test split (never trained on); benign test prompts "
        "come from topics disjoint from training. Per-prompt scores are in the JSON.",
    ]
    (RESULTS / "bench_guard.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
