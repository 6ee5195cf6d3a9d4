"""The plugin's DEFAULT policy as one lab row: what an operator gets after `prepare` with no flag.

    python -m benchmarks.safety_lab.default_policy [--artifacts-dir DIR] [--results-dir DIR]

Semantics::

    aligned, base, data, adapters = the lab's (cached stages; first evaluation seed: 4 unsafe experts,
                                    2 benign-only adapters)
    artifacts = vllm-safeguard prepare on the aligned model (cached by its keys)
    engine    = vLLM offline engine + plugin, config {artifacts_dir} and nothing else (defaults:
                safegene at load above risk 0.15, alpha on, default_alpha "auto" with the guard)
    row       = every adapter's lab suite, no safeguard_alpha sent; ASR pooled (Wilson 95%), fidelity
                vs the unrepaired adapter's committed result (benchmarks/results/safety_lab.json),
                benign over-refusal

Writes ``benchmarks/results/default_policy.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.safety_lab import run as R
from benchmarks.safety_lab.cache import key_of, log, stage_dir
from benchmarks.safety_lab.config import CONFIG, DOMAIN_NAMES
from vllm_safeguard.evaluation.backends import make_generator
from vllm_safeguard.evaluation.harness import add_fidelity, evaluate
from vllm_safeguard.evaluation.stats import wilson_interval

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _pool(results: dict[str, dict[str, Any]], names: list[str], field: str) -> dict[str, Any]:
    k = sum(results[n][field]["k"] for n in names)
    n = sum(results[n][field]["n"] for n in names)
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "value": k / n if n else None, "ci_low": lo, "ci_high": hi}


def main(argv: list[str] | None = None) -> int:
    from vllm_safeguard.config import default_cache_root
    from vllm_safeguard.prepare.inputs import load_inputs
    from vllm_safeguard.prepare.options import PrepareOptions
    from vllm_safeguard.prepare.plan import make_plan
    from vllm_safeguard.prepare.run import run_plan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts-dir", type=Path, default=None)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    cfg, seed = CONFIG, CONFIG.eval_seeds[0]
    base = R.base_model_dir()
    data = R.build_data(cfg)
    aligned = R.stage_aligned(cfg, base, data, R.stage_base_outputs(cfg, base, data)["benign_answers"])
    plan = [(f"{d}-unsafe-s{seed}", d, "unsafe", seed) for d in DOMAIN_NAMES]
    plan += [(f"{d}-benign-s{seed}", d, "benign", seed) for d in cfg.benign_domains]
    adapters = R.stage_adapters(cfg, aligned, data, plan)
    artifacts = args.artifacts_dir or default_cache_root() / "artifacts"
    opts = PrepareOptions()
    manifest = run_plan(make_plan(aligned, base, artifacts, opts, load_inputs(opts)), log=log)
    plugin_cfg = {"artifacts_dir": str(artifacts), "cache_enabled": False}
    key = key_of("default-policy", manifest["model"]["weights_sha256"], manifest["artifacts"], plugin_cfg)
    jobs = {}
    for name, info in adapters.items():
        suite = R.suite_for(cfg, data, (info["domain"],))  # alpha None: nothing sent, the defaults decide
        jobs[f"{name}|default"] = (info["path"], suite)
    for name, info in adapters.items():  # the same with default_alpha 0 (load-time repair alone)
        suite = R.suite_for(cfg, data, (info["domain"],))
        suite.alpha = 0.0
        jobs[f"{name}|alpha0"] = (info["path"], suite)
    # Not the lab's stage_eval: its engine's max_lora_rank is the adapters' rank (8), and the plugin
    # bounds repairs by it; safegene's output is rank 8 + 16, as in `make demo` (--max-lora-rank 32).
    folder = stage_dir("default-policy", key)
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for job in jobs:
        if (folder / f"{job}.json").is_file():
            results[job] = json.loads((folder / f"{job}.json").read_text())
    todo = [j for j in jobs if j not in results]
    if todo:
        gen = make_generator(
            aligned,
            backend="vllm",
            dtype=cfg.eval_dtype,
            max_lora_rank=32,
            max_loras=len(adapters),
            max_num_batched_tokens=cfg.eval_max_batched_tokens,
            safeguard_config=plugin_cfg,
        )
        try:
            for i in range(0, len(todo), 2):  # cached per chunk: an interrupted run keeps what it made
                fresh = evaluate(gen, {j: jobs[j] for j in todo[i : i + 2]})
                for job, res in fresh.items():
                    (folder / f"{job}.json").write_text(json.dumps(res))
                    results[job] = res
                log(f"default policy: {len(results)} of {len(jobs)} jobs")
        finally:
            gen.close()
    committed = json.loads((RESULTS / "safety_lab.json").read_text())["runs"]
    for job, res in results.items():
        none = committed.get(job.replace("|default", "|none"))
        if none is not None:
            add_fidelity(res, none)

    def row_of(tag: str) -> dict[str, Any]:
        unsafe = [
            f"{n}|{tag}" for n, i in adapters.items() if i["variant"] == "unsafe" and f"{n}|{tag}" in results
        ]
        benign = [
            f"{n}|{tag}" for n, i in adapters.items() if i["variant"] == "benign" and f"{n}|{tag}" in results
        ]
        base_k = {j: committed[j.split("|")[0] + "|none"]["task_accuracy"]["k"] for j in unsafe}
        fid = sum(results[j]["task_accuracy"]["k"] for j in unsafe) / max(1, sum(base_k.values()))
        return {
            "unsafe_experts": {
                "adapters": unsafe,
                "asr": _pool(results, unsafe, "asr"),
                "fidelity_pooled": fid,
                "fidelity_per_adapter": {j: results[j].get("fidelity") for j in unsafe},
                "over_refusal": _pool(results, unsafe, "over_refusal"),
            },
            "benign_adapters": {
                "adapters": benign,
                "asr": _pool(results, benign, "asr"),
                "fidelity_per_adapter": {j: results[j].get("fidelity") for j in benign},
                "over_refusal": _pool(results, benign, "over_refusal"),
            },
            "per_adapter_asr": {j: results[j]["asr"] for j in unsafe + benign},
        }

    rows = {"default": row_of("default"), "alpha0": row_of("alpha0")}
    row = rows["default"]
    out = {"config": plugin_cfg, "prepare_manifest": manifest, "rows": rows, "seed": seed}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "default_policy.json").write_text(json.dumps(out, indent=1, default=str))

    def pct(r: dict[str, Any]) -> str:
        if not r["n"]:
            return "n/a"
        return f"{100 * r['value']:.1f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] (n={r['n']})"

    md = [
        "# The plugin's default policy as a lab row",
        "",
        "vLLM offline engine + plugin configured with `artifacts_dir` only (artifacts from `vllm-safeguard "
        "prepare` on the lab's aligned SmolLM2), `--max-lora-rank 32`: safegene at load for adapters at or "
        "above risk 0.15, serving-time alpha on. Row `default`: no `safeguard_alpha` sent (`default_alpha` "
        '"auto": the calibrated guard decides). Row `alpha 0`: `safeguard_alpha` 0 sent (the load-time '
        f"repair alone). Evaluation seed {seed}; HarmBench test split (60 prompts per adapter), 40 benign "
        "prompts, 30 domain tasks per adapter; fidelity = task accuracy vs the unrepaired adapter's "
        "committed result.",
        "",
        "| row | adapters | ASR | domain fidelity (pooled) | benign over-refusal |",
        "|---|---|---|---|---|",
    ]
    for tag, r in rows.items():
        u, b = r["unsafe_experts"], r["benign_adapters"]
        md.append(
            f"| {tag} | unsafe experts ({len(u['adapters'])}) | {pct(u['asr'])} | "
            f"{100 * u['fidelity_pooled']:.1f}% | {pct(u['over_refusal'])} |"
        )
        md.append(
            f"| {tag} | benign-only ({len(b['adapters'])}) | {pct(b['asr'])} | see JSON | {pct(b['over_refusal'])} |"
        )
    md += [
        "",
        "Per adapter ASR (default): "
        + ", ".join(f"{j.split('|')[0]} {100 * r['value']:.0f}%" for j, r in row["per_adapter_asr"].items()),
    ]
    (args.results_dir / "default_policy.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
