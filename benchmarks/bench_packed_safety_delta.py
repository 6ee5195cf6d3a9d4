"""The CPU serving path's safety delta per decode step: packed (``packed_safety_delta``) vs the fused
kernel's torch reference (``fused_safety_lora_ref`` with no task weights, what the CPU wrapper ran
before), on SmolLM2-135M's shapes.

    python -m benchmarks.bench_packed_safety_delta [--tokens 60] [--rounds 30]

One "step" = the safety delta of every bound layer the lab's safety adapter selects (15 decoder
layers x qkv (576 -> 576/192/192), o (576 -> 576), gate_up (576 -> 1536/1536), down (1536 -> 576)),
rank 16, ``--tokens`` tokens, all with alpha 1 (the serving benchmark's "alpha active" arm) and half
of them alpha 0 (the gather path). A third variant is the layout that was rejected: every slice's B
in one block-diagonal matrix (one expand GEMM per layer instead of one per slice). The variants take
turns step by step in one process (order alternating), so machine drift hits all; reported: median ms
per step and median ratios with bootstrap 95% intervals. Writes ``benchmarks/results/bench_packed_safety_delta.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.results_io import machine, write_results
from kernels.torch_ops import fused_safety_lora_ref, pack_safety, packed_safety_delta

RESULTS = Path(__file__).resolve().parent / "results"
# SmolLM2-135M: (hidden in, output slices) of the four LoRA-wrapped modules of a decoder layer
MODULES = [(576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,))]


def _ratio(a: list[float], b: list[float]) -> tuple[float, list[float]]:
    """Median of the per-round ratios a/b and its bootstrap 95% interval."""
    ratios = np.array(a) / np.array(b)
    rng = np.random.default_rng(0)
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(2000)]
    return float(np.median(ratios)), [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    layers: list[tuple[Any, ...]] = []
    for _ in range(args.layers):
        for hidden, widths in MODULES:
            a = [(torch.randn(args.rank, hidden, generator=g) * 0.02).to(dtype) for _ in widths]
            b = [(torch.randn(n, args.rank, generator=g) * 0.02).to(dtype) for n in widths]
            p = pack_safety(a, b)
            layers.append((hidden, sum(widths), a, b, p, torch.block_diag(*p.b_t)))
    m = args.tokens
    xs = {h: torch.randn(m, h, generator=g).to(dtype) for h in (576, 1536)}
    ys = {w: torch.randn(m, w, generator=g).to(dtype) for w in (960, 576, 3072)}
    no_task = torch.full((m,), -1, dtype=torch.long)
    alphas = {"all": torch.ones(m), "half": torch.tensor([float(i % 2) for i in range(m)])}

    def reference(alpha: torch.Tensor) -> None:
        for hidden, width, a, b, _, _ in layers:
            if bool(torch.any(alpha != 0)):  # what the CPU wrapper checked per layer
                fused_safety_lora_ref(ys[width], xs[hidden], None, None, a, b, alpha, no_task)

    def packed(alpha: torch.Tensor) -> None:
        for hidden, width, _, _, p, _ in layers:
            packed_safety_delta(ys[width], xs[hidden], p, alpha)

    def block_diagonal(alpha: torch.Tensor) -> None:
        """The rejected layout: every slice's B in one block-diagonal matrix, one expand GEMM."""
        for hidden, width, _, _, p, bd in layers:
            rows = (alpha[:m] != 0).nonzero().squeeze(1)
            if rows.numel() == m:
                ys[width].addmm_(torch.mm(xs[hidden], p.a_t).mul_(alpha[:m, None]), bd)
            elif rows.numel():
                buf = torch.mm(xs[hidden].index_select(0, rows), p.a_t).mul_(alpha[rows, None])
                ys[width].index_add_(0, rows, buf @ bd)

    variants = {"reference": reference, "packed": packed, "block_diagonal": block_diagonal}
    result: dict[str, Any] = {
        "workload": (
            f"SmolLM2-135M shapes, {args.layers} layers x 4 modules, rank {args.rank}, {m} tokens, "
            f"{args.dtype}, {args.rounds} rounds, variants alternating step by step"
        ),
        "machine": machine(),
        "config": vars(args) | {"out": str(args.out)},
        "cases": {},
    }
    md = [
        "# bench_packed_safety_delta: the CPU path's safety delta per decode step",
        "",
        result["workload"] + ".",
        "",
        "| alpha | reference ms/step | packed ms/step | block-diagonal ms/step | packed / reference (95% CI) | block-diagonal / packed (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for name, alpha in alphas.items():
            for f in variants.values():  # warm-up
                f(alpha)
            ms: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(args.rounds):
                for k in variants if r % 2 == 0 else reversed(list(variants)):
                    t0 = time.perf_counter()
                    variants[k](alpha)
                    ms[k].append((time.perf_counter() - t0) * 1e3)
            med = {k: float(np.median(v)) for k, v in ms.items()}
            packed_vs_ref, ci = _ratio(ms["packed"], ms["reference"])
            bd_vs_packed, ci_bd = _ratio(ms["block_diagonal"], ms["packed"])
            result["cases"][name] = {"ms": ms, "median_ms": med, "ratio_median": packed_vs_ref, "ratio_ci95": ci,
                                     "block_diagonal_vs_packed": bd_vs_packed, "block_diagonal_vs_packed_ci95": ci_bd}  # fmt: skip
            md.append(
                f"| {name} | {med['reference']:.2f} | {med['packed']:.2f} | {med['block_diagonal']:.2f} | "
                f"{packed_vs_ref:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {bd_vs_packed:.3f} [{ci_bd[0]:.3f}, {ci_bd[1]:.3f}] |"
            )
    md += ["", f"Machine: {result['machine']}"]
    write_results(args.out, "bench_packed_safety_delta", result, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
