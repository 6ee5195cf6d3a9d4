"""Serving overhead of the plugin on the lab's real model, as an interleaved A/B inside one process.

    python -m benchmarks.bench_serving_ab [--rounds 20] [--requests 60] [--max-tokens 32]

Why not the HTTP server: on this shared 2-core machine three alternating HTTP-server runs of the same
arm ranged 777-1969 tok/s (issue 18), which drowns a 3% effect. Here both engines live in one process
and take turns batch by batch (order alternating every round), so the machine's drift hits both.

Arms (each a vLLM offline engine, engine core and worker in their own processes, spawned):

* ``off``: no plugin in the engine's processes (``VLLM_PLUGINS`` empty);
* ``on``: the plugin with ``bench_stall``'s method (NLSR data-free, half the neurons) and the lab's reference, every adapter already
  admitted (the steady state: the first batch admits them and is not timed).

Workload: SmolLM2-135M (the lab's aligned model), fp32, 4 rank-16 adapters (partial undos of the
alignment delta filled to rank 16, as in ``bench_stall``) and the base model, requests cycling over
them in one batch of ``--requests``, greedy, ``--max-tokens`` each (``ignore_eos``). A round = one
batch per arm; reported: the median on/off throughput ratio over rounds with a bootstrap 95% interval,
and how many outputs differ between the arms (the repaired adapters must differ from the raw ones).
The client-side front end (input processing) carries the plugin's API-side checks in both arms.
Target (issue 18): on >= 0.97x off. Writes ``benchmarks/results/bench_serving_ab.{json,md}``.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
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
    engines = {"on": engine(aligned, plugin), "off": engine(aligned, None)}
    loras: list[Any] = [LoRARequest(f"a{j}", j + 1, str(p)) for j, p in enumerate(adapters)] + [None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    lora_of = [loras[i % len(loras)] for i in range(args.requests)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def batch(arm: str) -> tuple[float, list[list[int]]]:
        time.sleep(0.5)  # let the other engine's OpenMP threads stop spinning
        t0 = time.perf_counter()
        outs = engines[arm].generate(prompts, sp, lora_request=lora_of, use_tqdm=False)
        wall = time.perf_counter() - t0
        toks = [list(o.outputs[0].token_ids) for o in outs]
        return sum(map(len, toks)) / wall, toks

    tokens = {arm: batch(arm)[1] for arm in ("on", "off")}  # warm-up; "on" admits its adapters here
    tok_s: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for arm in ("on", "off") if r % 2 == 0 else ("off", "on"):
            speed, _ = batch(arm)
            tok_s[arm].append(speed)
        print(
            f"round {r + 1}/{args.rounds}: on {tok_s['on'][-1]:.1f}, off {tok_s['off'][-1]:.1f} tok/s",
            flush=True,
        )
    ratios = np.array(tok_s["on"]) / np.array(tok_s["off"])
    rng = np.random.default_rng(0)
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(2000)]
    differ = sum(a != b for a, b in zip(tokens["on"], tokens["off"], strict=True))
    result: dict[str, Any] = {
        "workload": (
            f"SmolLM2-135M (the lab's aligned model), fp32, vllm-cpu offline engines in one process (spawned "
            f"engine cores); {args.requests} requests per batch cycling over 4 rank-16 adapters and the base "
            f"model, {args.max_tokens} tokens each; {args.rounds} rounds, arm order alternating."
        ),
        "on_tok_s": tok_s["on"],
        "off_tok_s": tok_s["off"],
        "ratio_on_over_off_median": float(np.median(ratios)),
        "ratio_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "outputs_differing": f"{differ}/{len(prompts)} (adapter requests: {sum(x is not None for x in lora_of)})",
        "target": "on >= 0.97x off",
        "machine": machine(),
        "config": vars(args) | {"out": str(args.out), "workdir": str(workdir)},
    }
    md = [
        "# bench_serving_ab: plugin on vs off, interleaved in one process",
        "",
        result["workload"],
        "",
        "| arm | median tok/s | rounds |",
        "|---|---|---|",
        f"| off | {np.median(tok_s['off']):.1f} | {args.rounds} |",
        f"| on (adapters admitted) | {np.median(tok_s['on']):.1f} | {args.rounds} |",
        "",
        f"on / off: median ratio **{result['ratio_on_over_off_median']:.3f}** "
        f"[{result['ratio_ci95'][0]:.3f}, {result['ratio_ci95'][1]:.3f}] (bootstrap 95%); target {result['target']}.",
        f"Outputs differing between arms: {result['outputs_differing']}.",
        "",
        f"Machine: {result['machine']}",
        "",
    ]
    write_results(args.out, "bench_serving_ab", result, "\n".join(md))
    for e in engines.values():
        e.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
