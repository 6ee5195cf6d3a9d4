"""Fused task-LoRA + safety-delta vs unfused (task LoRA pass + separate safety LoRA pass) vs no safety.

On a CUDA device this times the Triton kernels (``kernels/triton_ops/fused_safety_lora*.py``):
  * fused:      one shrink + one expand launch (task and safety ranks concatenated)
  * unfused:    a task-LoRA pass and a separate safety-LoRA pass (two shrinks + two expands; the
                same kernels with ``safety_a=None`` resp. ``lora_a_stacked=None``, i.e. plain punica
                passes)
  * no_safety:  the task-LoRA pass alone (the floor: what serving costs without the safety delta)
  * vllm:       vLLM's own punica task-LoRA pass (its ``PunicaWrapperGPU``: ``lora_shrink`` +
                ``lora_expand``) plus our separate safety-only pass: what serving without the fusion
                would run. Only where vLLM is importable (not on the lent GPU machine, which has no
                vLLM); the report says when it is missing.
each eager and, where capture works, replayed from a CUDA graph (how vLLM runs decode).

Without CUDA it times the torch reference / CPU path (``kernels/torch_ops/fused_safety_lora.py``) the
same ways (``vllm``: vLLM's ``PunicaWrapperCPU`` task pass + the reference's safety pass) and says so:
those numbers say nothing about the GPU kernels.

All variants of one shape are timed round-robin in the same run, so ratios are measured under the
same machine load. Writes ``benchmarks/results/bench_fused_safety_lora.{json,md}`` (one name across
kernel, reference, test and benchmark: ``fused_safety_lora``).

    python benchmarks/bench_fused_safety_lora.py [--quick] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.torch_ops import fused_safety_lora_ref  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NAME = "bench_fused_safety_lora"  # writes RESULTS / NAME.{json,md}

# (name, hidden_in, output slices)
GPU_MODULES = [
    ("llama8b.qkv", 4096, (4096, 1024, 1024)),
    ("llama8b.gate_up", 4096, (14336, 14336)),
    ("llama8b.down", 14336, (4096,)),
]
GPU_TOKENS = [1, 16, 64, 256, 2048]
CPU_MODULES = [  # SmolLM2-135M (the model this project serves on CPU)
    ("smollm2.qkv", 576, (576, 192, 192)),
    ("smollm2.gate_up", 576, (1536, 1536)),
    ("smollm2.down", 1536, (576,)),
]
CPU_TOKENS = [16, 256]


def make_inputs(k: int, outs: tuple[int, ...], m: int, r: int, r_s: int, max_loras: int, dtype, device):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    mapping = torch.randint(-1, max_loras, (m,), generator=g, dtype=torch.int32)
    alpha = torch.tensor([0.5, 1.0, 2.0, 1.0])[torch.randint(0, 4, (m,), generator=g)]
    return dict(
        x=rnd(m, k),
        y=rnd(m, sum(outs)),
        la=[rnd(max_loras, r, k, scale=k**-0.5) for _ in outs],
        lb=[rnd(max_loras, n, r, scale=r**-0.5) for n in outs],
        sa=[rnd(r_s, k, scale=k**-0.5) for _ in outs],
        sb=[rnd(n, r_s, scale=r_s**-0.5) for n in outs],
        mapping=mapping,
        alpha=alpha,
    )


def time_round_robin(fns: dict[str, Callable[[], None]], reps: int, inner: int, sync: Callable[[], None]):
    """Median seconds per call of each fn, interleaving the variants rep by rep."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (compiles Triton kernels, fills caches)
        for _ in range(3):
            fn()
    sync()
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def cpu_variants(d: dict) -> dict[str, Callable[[], None]]:
    y = d["y"].clone()
    x, la, lb, sa, sb, alpha, mapping = d["x"], d["la"], d["lb"], d["sa"], d["sb"], d["alpha"], d["mapping"]

    def fused() -> None:
        fused_safety_lora_ref(y, x, la, lb, sa, sb, alpha, mapping)

    def unfused() -> None:
        fused_safety_lora_ref(y, x, la, lb, None, None, alpha, mapping)
        fused_safety_lora_ref(y, x, None, None, sa, sb, alpha, mapping)

    def no_safety() -> None:
        fused_safety_lora_ref(y, x, la, lb, None, None, alpha, mapping)

    out = {"fused": fused, "unfused": unfused, "no_safety": no_safety}
    task = vllm_task_pass(d, d["la"][0].size(0), "cpu")
    if task is not None:

        def vllm_plus_safety() -> None:
            task()
            fused_safety_lora_ref(y, x, None, None, sa, sb, alpha, mapping)

        out["vllm"] = vllm_plus_safety
    return out


def vllm_task_pass(d: dict, max_loras: int, device: str) -> Callable[[], None] | None:
    """vLLM's own task-LoRA pass through its platform punica wrapper, on ``d``'s batch and weights
    (None where vLLM is not importable)."""
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.layers import LoRAMapping

        if device == "cuda":
            from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU as Wrapper
        else:
            from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU as Wrapper
    except Exception as e:
        print(f"  vLLM not importable ({type(e).__name__}: {e}): no vLLM punica baseline")
        return None
    m = d["x"].size(0)
    rank = d["la"][0].size(1)
    cfg = LoRAConfig(max_lora_rank=max(8, rank), max_loras=max_loras)
    w = Wrapper(m, m, device, lora_config=cfg)  # max_batches: every token may start a run
    ids = tuple(int(s) + 1 for s in d["mapping"].tolist())  # slot s holds LoRA id s + 1; -1 -> 0
    w.update_metadata(LoRAMapping(ids, ids, is_prefill=True), list(range(1, max_loras + 1)), max_loras, 100)
    la = tuple(t.unsqueeze(1) for t in d["la"])  # vLLM's [max_loras, 1, r, in]
    lb = tuple(t.unsqueeze(1) for t in d["lb"])
    outs = tuple(t.size(1) for t in d["lb"])
    y, x = d["y"].clone(), d["x"]

    def task() -> None:
        w.add_lora_linear(y, x, la, lb, 1.0, outs)

    return task


def gpu_variants(d: dict, max_loras: int) -> tuple[dict[str, Callable[[], None]], object]:
    from kernels.triton_ops.fused_safety_lora import fused_safety_lora
    from kernels.triton_ops.fused_safety_lora_meta import SafetyLoRAKernelMeta

    m = d["x"].size(0)
    meta = SafetyLoRAKernelMeta.make(max_loras, m, d["x"].device)
    meta.prepare_tensors(d["mapping"], d["alpha"])
    args = meta.meta_args(m, specialize_active_groups=False)
    alpha = meta.token_alpha[:m]
    y = d["y"].clone()
    x, la, lb, sa, sb = d["x"], d["la"], d["lb"], d["sa"], d["sb"]

    def fused() -> None:
        fused_safety_lora(y, x, la, lb, sa, sb, alpha, *args)

    def unfused() -> None:
        fused_safety_lora(y, x, la, lb, None, None, alpha, *args)
        fused_safety_lora(y, x, None, None, sa, sb, alpha, *args)

    def no_safety() -> None:
        fused_safety_lora(y, x, la, lb, None, None, alpha, *args)

    out = {"fused": fused, "unfused": unfused, "no_safety": no_safety}
    task = vllm_task_pass(d, max_loras, "cuda")
    if task is not None:

        def vllm_plus_safety() -> None:
            task()
            fused_safety_lora(y, x, None, None, sa, sb, alpha, *args)

        out["vllm"] = vllm_plus_safety
    return out, meta


def graphed(fns: dict[str, Callable[[], None]], replays: int = 20) -> dict[str, Callable[[], None]]:
    """Each variant captured into a CUDA graph of `replays` calls (launch overhead removed)."""
    out = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(replays):
                fn()
        out[name] = g.replay
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument(
        "--cpu", action="store_true", help="time the CPU reference path even if CUDA is available"
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--safety-rank", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument(
        "--threads", type=int, default=1, help="CPU: torch threads (1 = robust on a shared machine)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()

    on_gpu = torch.cuda.is_available() and not a.cpu and os.environ.get("TRITON_INTERPRET", "0") != "1"
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # fp32 is what this project serves on CPU
    if not on_gpu:
        # OpenMP threads spin-wait badly when the cores are shared with other jobs; one thread gives
        # stable ratios (the absolute numbers are then single-core numbers).
        torch.set_num_threads(a.threads)
    modules = GPU_MODULES if on_gpu else CPU_MODULES
    tokens = GPU_TOKENS if on_gpu else CPU_TOKENS
    if a.quick:
        modules, tokens = modules[:1], [tokens[0], tokens[-1]]  # decode and prefill sizes
    reps, inner = (15, 10) if on_gpu else ((5, 3) if a.quick else (9, 5))
    if on_gpu:
        import triton

        dev_name = torch.cuda.get_device_name()
        path = "Triton kernels (kernels.triton_ops.fused_safety_lora)"
        versions = {"torch": torch.__version__, "triton": triton.__version__}
    else:
        dev_name = (
            f"CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()})"
        )
        path = "torch reference / CPU path (kernels.torch_ops.fused_safety_lora_ref); NO GPU WAS USED"
        versions = {"torch": torch.__version__}
    print(
        f"device: {dev_name}\npath:   {path}\ndtype:  {dtype}, r={a.rank}, r_s={a.safety_rank}, max_loras={a.max_loras}"
    )

    rows = []
    for name, k, outs in modules:
        for m in tokens:
            d = make_inputs(k, outs, m, a.rank, a.safety_rank, a.max_loras, dtype, device)
            modes: dict[str, dict[str, float]] = {}
            if on_gpu:
                fns, _meta = gpu_variants(d, a.max_loras)
                modes["eager"] = time_round_robin(fns, reps, inner, torch.cuda.synchronize)
                try:
                    per = 20
                    t = time_round_robin(graphed(fns, per), reps, 1, torch.cuda.synchronize)
                    modes["cuda_graph"] = {kk: v / per for kk, v in t.items()}
                except Exception as exc:  # report, don't hide
                    print(f"  cuda graph capture failed for {name} m={m}: {exc!r}")
            else:
                modes["eager"] = time_round_robin(cpu_variants(d), reps, inner, lambda: None)
            for mode, t in modes.items():
                row = {
                    "module": name,
                    "hidden_in": k,
                    "out_slices": list(outs),
                    "tokens": m,
                    "mode": mode,
                    "fused_us": t["fused"] * 1e6,
                    "unfused_us": t["unfused"] * 1e6,
                    "no_safety_us": t["no_safety"] * 1e6,
                    "speedup_fused_vs_unfused": t["unfused"] / t["fused"],
                    "overhead_fused_vs_no_safety": t["fused"] / t["no_safety"],
                    "vllm_us": t["vllm"] * 1e6 if "vllm" in t else None,
                    "speedup_fused_vs_vllm": t["vllm"] / t["fused"] if "vllm" in t else None,
                }
                rows.append(row)
                vllm_txt = (
                    f"  vLLM+safety {row['vllm_us']:9.1f} us ({row['speedup_fused_vs_vllm']:.2f}x)"
                    if row["vllm_us"] is not None
                    else "  vLLM: not importable"
                )
                print(
                    f"{name:16s} m={m:5d} {mode:10s} fused {row['fused_us']:9.1f} us  unfused {row['unfused_us']:9.1f} us"
                    f"  no-safety {row['no_safety_us']:9.1f} us  fused/unfused speedup {row['speedup_fused_vs_unfused']:.2f}x"
                    f"  fused/no-safety {row['overhead_fused_vs_no_safety']:.2f}x{vllm_txt}"
                )

    geo, geo_vllm = {}, {}
    for mode in sorted({r["mode"] for r in rows}):
        sp = [r["speedup_fused_vs_unfused"] for r in rows if r["mode"] == mode]
        geo[mode] = statistics.geometric_mean(sp)
        sv = [r["speedup_fused_vs_vllm"] for r in rows if r["mode"] == mode and r["speedup_fused_vs_vllm"]]
        if sv:
            geo_vllm[mode] = statistics.geometric_mean(sv)
    result = {
        "device": dev_name,
        "gpu_used": on_gpu,
        "path": path,
        "dtype": str(dtype),
        "rank": a.rank,
        "safety_rank": a.safety_rank,
        "max_loras": a.max_loras,
        "versions": versions,
        "target": "GPU: fused >= 1.2x unfused",
        "geomean_speedup_fused_vs_unfused": geo,
        "geomean_speedup_fused_vs_vllm_plus_safety": geo_vllm or "vLLM not importable: no vLLM baseline",
        "rows": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# {NAME}: fused task-LoRA + safety delta",
        "",
        f"- device: **{dev_name}**",
        f"- path timed: {path}",
        f"- dtype {dtype}, task rank {a.rank}, safety rank {a.safety_rank}, max_loras {a.max_loras};"
        " tokens mixed over adapters and no adapter; alpha in {0.5, 1, 2}",
        "- all variants of a row timed round-robin in one run (median); unfused = task pass + separate safety pass",
        "",
    ]
    if not on_gpu:
        md += [
            "**No GPU was available for this run: these are CPU timings of the torch reference path, not of the"
            " Triton kernels. The GPU target (fused >= 1.2x unfused) is not measured here.**",
            "",
        ]
    md += [
        "| module | tokens | mode | fused (us) | unfused (us) | vLLM task + safety (us) | no safety (us) | fused vs unfused | fused vs vLLM + safety | fused / no safety |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        v_us = f"{r['vllm_us']:.1f}" if r["vllm_us"] is not None else "n/a"
        v_sp = f"{r['speedup_fused_vs_vllm']:.2f}x" if r["speedup_fused_vs_vllm"] is not None else "n/a"
        md.append(
            f"| {r['module']} | {r['tokens']} | {r['mode']} | {r['fused_us']:.1f} | {r['unfused_us']:.1f} |"
            f" {v_us} | {r['no_safety_us']:.1f} | {r['speedup_fused_vs_unfused']:.2f}x | {v_sp} |"
            f" {r['overhead_fused_vs_no_safety']:.2f}x |"
        )
    md += [
        "",
        "Geometric-mean speedup fused vs unfused: " + ", ".join(f"{k} {v:.2f}x" for k, v in geo.items()),
        "Geometric-mean speedup fused vs vLLM's task pass + safety pass: "
        + (", ".join(f"{k} {v:.2f}x" for k, v in geo_vllm.items()) or "n/a (vLLM not importable)"),
        "",
    ]
    (a.out / f"{NAME}.md").write_text("\n".join(md))
    print("geomean fused vs unfused:", {k: round(v, 3) for k, v in geo.items()})
    print(f"wrote {a.out / NAME}.json and .md")


if __name__ == "__main__":
    main()
