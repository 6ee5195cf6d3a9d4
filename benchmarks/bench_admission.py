"""What the fail-closed admission (canonical form, coverage, bounds, re-scoring) costs, before vs after.

Two measurements, both interleaved A/B in one process so that the machine's drift hits both arms:

1. **Cache hit** (the eviction reload / same-bytes load path, which must stay ~1 ms):
   ``SafeguardPipeline.process`` on the tiny workspace's adapter, warm, many calls. "before" is the
   previous release's hit path (a git worktree of ``--before-ref``, run in a subprocess, same
   interleaving), "after" this tree.
2. **Cold admission on a 7B-shaped adapter** (the shapes of ``bench_repair``: 32 layers x 7 modules,
   rank 16, reference rank 32): "before" = what the old pipeline computed (risk score + method),
   "after" = :func:`vllm_safeguard.admission.admit` (canonicalize, coverage, update bound, served-dtype
   check, score, method, canonicalize, bound, re-score) + writing the canonical folder vs the old
   ``save_adapter``; method NLSR (neuron_fraction 0.5) and SafeLoRA.

Usage: python benchmarks/bench_admission.py [--rounds 7] [--hits 400] [--before-ref HEAD~1]
Writes benchmarks/results/bench_admission.json and .md (median and min-max over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# Run by the subprocess arm (either tree): N warm hits, print the per-call seconds as JSON.
HIT_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from vllm_safeguard.config import load_config
from vllm_safeguard.admission.pipeline import PipelineContext, SafeguardPipeline
ws, cache, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sg = {"cache_dir": cache, "method": "nlsr_datafree", "method_options": {"neuron_fraction": 0.5}, "risk_threshold": 0.1}
cfg = load_config({"safeguard": sg}, env={})
p = SafeguardPipeline.create(cfg, PipelineContext("tiny", ws / "model", max_lora_rank=8))
src = ws / "adapters" / "unsafe"
p.process(src, "u")
out = []
for _ in range(n):
    t0 = time.perf_counter(); o = p.process(src, "u"); out.append(time.perf_counter() - t0)
    assert o.cache_hit
print(json.dumps(out))
"""


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def hit_arm(tree: Path, ws: Path, cache: Path, n: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    run = subprocess.run(
        [sys.executable, "-c", HIT_SCRIPT, str(ws), str(cache), str(n)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def cold_arms(rounds: int) -> dict[str, Any]:
    from benchmarks.bench_repair import build
    from vllm_safeguard.admission.canonical import write_canonical
    from vllm_safeguard.admission.rules import AdmissionRules, admit
    from vllm_safeguard.core.adapter_io import save_adapter
    from vllm_safeguard.core.risk import score_adapter
    from vllm_safeguard.methods import repair

    reference, adapter, _ = build(32, 8)
    out: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    try:
        for method, opts in (("nlsr_datafree", {"neuron_fraction": 0.5}), ("safelora_subspace", {})):
            rules = AdmissionRules(risk_threshold=0.0, max_served_risk=None)  # every adapter repaired

            def before(method: str = method, opts: dict[str, Any] = opts) -> None:
                score_adapter(adapter, reference)
                res = repair(adapter, reference, method, opts, max_rank=64)
                save_adapter(res.adapter, tmp / "before")

            def after(
                method: str = method, opts: dict[str, Any] = opts, rules: AdmissionRules = rules
            ) -> None:
                adm = admit(
                    adapter,
                    reference,
                    rules,
                    lambda c, risk: repair(c, reference, method, opts, max_rank=64, risk=risk),
                    served_dtype=torch.bfloat16,
                )
                write_canonical(adm.served, tmp / "after")

            before(), after()  # warm-up (allocator, lazy imports)
            times: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(rounds):
                for arm, fn in (
                    (("before", before), ("after", after))
                    if i % 2 == 0
                    else (("after", after), ("before", before))
                ):
                    t0 = time.perf_counter()
                    fn()
                    times[arm].append(time.perf_counter() - t0)
            ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
            out[method] = {
                "before_s": _spread(times["before"]),
                "after_s": _spread(times["after"]),
                "ratio_after_over_before": _spread(ratios),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="Interleaved A/B rounds per measurement.")
    ap.add_argument("--hits", type=int, default=400, help="Warm cache hits per hit-arm round.")
    ap.add_argument("--before-ref", default="HEAD", help="git ref of the 'before' tree for the hit path.")
    args = ap.parse_args()

    from vllm_safeguard.testing.workspace import prepare_tiny_workspace

    tmp = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    old_tree = tmp / "before-tree"
    try:
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old_tree), args.before_ref],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        ws = prepare_tiny_workspace(tmp / "ws")
        hits: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(args.rounds):
            order = (
                (("before", old_tree), ("after", ROOT))
                if i % 2 == 0
                else (("after", ROOT), ("before", old_tree))
            )
            for arm, tree in order:
                per_call = hit_arm(tree, ws.root, tmp / f"cache-{arm}", args.hits)
                hits[arm].append(statistics.median(per_call))
        cold = cold_arms(args.rounds)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "before_ref": args.before_ref,
        "cache_hit_ms": {
            arm: {k: v * 1000 if k != "n" else v for k, v in _spread(xs).items()} for arm, xs in hits.items()
        },
        "cold_7b": cold,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_admission.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "bench_admission.md").write_text(render(result))
    print(render(result))


def render(r: dict[str, Any]) -> str:
    h = r["cache_hit_ms"]
    lines = [
        "# Admission cost: fail-closed canonical admission vs the previous pipeline",
        "",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, torch {r['machine']['torch']}. "
        f"'before' = git `{r['before_ref']}`. Interleaved A/B; median [min, max] over rounds.",
        "",
        "## Cache hit (tiny workspace, warm `process()`; per-call median of each round)",
        "",
        "| arm | ms |",
        "|---|---|",
    ]
    for arm in ("before", "after"):
        lines.append(f"| {arm} | {h[arm]['median']:.3f} [{h[arm]['min']:.3f}, {h[arm]['max']:.3f}] |")
    lines += [
        "",
        "Target: a hit stays at about 1 ms or less.",
        "",
        "## Cold admission, 7B-shaped adapter (32 x 7 modules, rank 16; every adapter repaired)",
        "",
        "| method | before s (score + method + save) | after s (admit + write canonical) | after / before |",
        "|---|---|---|---|",
    ]
    for method, m in r["cold_7b"].items():
        b, a, q = m["before_s"], m["after_s"], m["ratio_after_over_before"]
        lines.append(
            f"| {method} | {b['median']:.3f} [{b['min']:.3f}, {b['max']:.3f}] | {a['median']:.3f} "
            f"[{a['min']:.3f}, {a['max']:.3f}] | {q['median']:.2f}x [{q['min']:.2f}, {q['max']:.2f}] |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
