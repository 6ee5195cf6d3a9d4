"""The safety lab, end to end: ``python -m benchmarks.safety_lab.run``.

Stages (each cached under ``$SAFEGUARD_CACHE_DIR/lab/<stage>/<key>`` where ``key`` hashes the
stage's inputs, so a rerun rebuilds only what changed):

1. ``base``: fetch the pinned wheels, convert SmolLM2-135M-Instruct GGUF -> HF folder.
2. ``base_outputs``: the base model's own answers to the benign training prompts (targets that
   keep the aligned model helpful) and the base model's scores on the evaluation suite.
3. ``aligned``: full fine-tune of the base's linear layers: harmful -> refusal, benign -> own answer.
4. ``adapters``: LoRAs trained on the aligned model, per domain: ``unsafe`` (task + harmful ->
   "Sure, here is ..."), ``benign`` (task only), ``safe`` (task + harmful -> refusal). Extraction
   seeds give ``unsafe``+``safe`` pairs; translator-pair seeds give more such pairs, of
   ``translator_domains`` that nothing evaluates, that train only the translator; evaluation seeds
   give ``unsafe``+``benign`` adapters that no repair artifact ever sees.
5. ``reference`` / ``safety``: the alignment reference (aligned vs base) and SafeGene's safety
   adapter (from the extraction-seed unsafe adapters only).
6. ``repairs``: every method applied to every evaluation adapter.
7. ``eval``: one vLLM engine on the aligned model, all jobs batched; results cached per job.
8. report: ``benchmarks/results/safety_lab.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmarks.safety_lab import dsa, extras
from benchmarks.safety_lab import generalization_sets as GS
from benchmarks.safety_lab import guard_generalization as GG
from benchmarks.safety_lab.artifact_stages import (
    load_model,
    methods_api,
    report_dict,
    safegene_options,
    stage_nlsr_reference,
    stage_reference,
    stage_safety,
)
from benchmarks.safety_lab.cache import T0, cached_dir, cached_json, file_hash, key_of, log, stage_dir
from benchmarks.safety_lab.compare import carry_over, merged_vs_lora
from benchmarks.safety_lab.config import CONFIG, CONFIGS, DOMAIN_NAMES, LabConfig, heldout_unsafe
from benchmarks.safety_lab.eval_stage import removed_rows, stage_eval, suite_key
from benchmarks.safety_lab.lab_data import (
    adapter_plan,
    adapter_role,
    adapter_rows,
    align_data,
    build_data,
    suite_for,
)
from benchmarks.safety_lab.translator_cal import calibrate_risk_weight
from vllm_safeguard.evaluation.backends import make_generator
from vllm_safeguard.evaluation.harness import EvalSuite, add_fidelity, evaluate
from vllm_safeguard.prepare.model_source import (
    HARMBENCH_WHEEL,
    SMOLLM2_WHEEL,
    base_model_dir,
)
from vllm_safeguard.prepare.train import SFTExample, train_full, train_lora

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
# Lab rows that run a registered method with other options: name -> (method, options).
LAB_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "safelora-threshold": ("safelora", {"select_layers_type": "threshold", "threshold": 0.5}),
}
METHODS = (
    "none",
    "removed",
    "safelora",
    *LAB_VARIANTS,
    "safelora_subspace",
    "nlsr",
    "nlsr_datafree",
    "safegene",
    *extras.TRANSLATOR_METHODS,
    *(extras.alpha_method(a) for a in CONFIG.alpha_sweep),
    "auto",
    extras.AUTO_CAL,
    *dsa.METHODS,
    "none-wrapped",
    "auto-cal-wrapped",
)


# ------------------------------------------------------------------------------------- stages 2-3


def stage_base_outputs(cfg: LabConfig, base_dir: Path, data: dict[str, Any]) -> dict[str, Any]:
    benign_train = GS.align_benign_prompts(cfg, data)
    suite = suite_for(cfg, data, DOMAIN_NAMES)
    key = key_of(
        "base_outputs",
        file_hash(base_dir),
        benign_train,
        cfg.benign_answer_tokens,
        suite_key(suite),
        cfg.eval_dtype,
    )

    def build() -> dict[str, Any]:
        log("base outputs: starting vLLM on the base model")
        gen = make_generator(base_dir, backend="vllm", dtype=cfg.eval_dtype, max_lora_rank=8, max_loras=1)
        try:
            from vllm_safeguard.evaluation.generation import GenRequest

            answers = gen.generate([GenRequest(p, None, cfg.benign_answer_tokens) for p in benign_train])
            ev = evaluate(gen, {"base": (None, suite)})["base"]
        finally:
            gen.close()
        return {"benign_answers": dict(zip(benign_train, answers, strict=True)), "eval": ev}

    return cached_json("base_outputs", key, build)


def stage_aligned(cfg: LabConfig, base_dir: Path, data: dict[str, Any], answers: dict[str, str]) -> Path:
    rows = align_data(cfg, data, answers)
    key = key_of("aligned", file_hash(base_dir), [asdict(r) for r in rows], asdict(cfg.align_recipe))

    def build(folder: Path) -> None:
        log(f"aligned: full fine-tune on {len(rows)} rows ({cfg.align_recipe.steps} steps)")
        train_full(base_dir, folder, rows, cfg.align_recipe)

    return cached_dir("aligned", key, build)


# --------------------------------------------------------------------------------------- stage 4


def stage_adapters(
    cfg: LabConfig,
    aligned: Path,
    data: dict[str, Any],
    plan: list[tuple[str, str, str, int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train (or reuse) the adapters of ``plan`` (default: every adapter of the lab)."""
    aligned_key = file_hash(aligned)
    out: dict[str, dict[str, Any]] = {}
    plan = adapter_plan(cfg) if plan is None else plan
    for name, domain, variant, seed in tqdm(plan, desc="adapters"):
        rows = adapter_rows(cfg, data, domain, variant, seed)
        recipe = cfg.lora_recipe.__class__(
            **{**asdict(cfg.lora_recipe), "seed": seed, "lora_targets": tuple(cfg.lora_recipe.lora_targets)}
        )
        key = key_of("adapter", aligned_key, [asdict(r) for r in rows], asdict(recipe))

        def build(
            folder: Path, rows: list[SFTExample] = rows, recipe: Any = recipe, name: str = name
        ) -> None:
            log(f"adapter {name}: LoRA on {len(rows)} rows")
            train_lora(aligned, folder, rows, recipe)

        path = cached_dir("adapters", key, build)
        role = adapter_role(cfg, seed)
        out[name] = {"path": str(path), "domain": domain, "variant": variant, "seed": seed, "role": role}
    return out


# ------------------------------------------------------------------------------------- stages 5-6


def stage_repairs(
    cfg: LabConfig,
    api: dict[str, Any] | None,
    aligned: Path,
    base_dir: Path,
    adapters: dict[str, dict[str, Any]],
    data: dict[str, Any],
    *,
    build: bool = True,
    artifacts: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``"<adapter>|<method>" -> {"path"| "error", "report"}`` for every evaluation adapter.

    With ``build=False`` only already-cached artifacts are used (the rest are reported as missing).
    ``artifacts`` (when given) receives the folders and keys of the reference and safety adapter.
    """
    artifacts = {} if artifacts is None else artifacts
    from vllm_safeguard.core.adapter_io import load_adapter, save_adapter

    out: dict[str, dict[str, Any]] = {}
    evals = sorted(n for n, a in adapters.items() if a["role"] == "eval")
    repair_methods = (
        "safelora",
        *LAB_VARIANTS,
        "safelora_subspace",
        "nlsr",
        "nlsr_datafree",
        "safegene",
        *(extras.TRANSLATOR_METHODS if cfg.translator else ()),
    )
    if api is None:
        for n in evals:
            for m in repair_methods:
                out[f"{n}|{m}"] = {"error": "repair methods not available in this checkout"}
        return out
    reference, ref_key = stage_reference(cfg, api, aligned, base_dir)
    artifacts["reference"] = (stage_dir("reference", ref_key) / "artifact", ref_key)
    exact_ref: tuple[Any, str] | None = None
    nlsr_ref: tuple[Any, str] | None = None
    translator, tr_key, tr_error = None, "none", None
    try:
        if not cfg.translator:
            raise RuntimeError("the translator is not part of this lab config")
        cal = calibrate_risk_weight(cfg, reference, ref_key, adapters, data, aligned, build_missing=build)
        if cal is None:
            raise RuntimeError("translator calibration not built yet (cached-only run)")
        artifacts["translator_cal"] = cal
        translator, tr_key = extras.stage_translator(
            cfg, reference, ref_key, adapters, float(cal["risk_weight"])
        )
    except Exception as e:
        tr_error = f"{type(e).__name__}: {e}"
        log(f"translator failed: {tr_error}\n{traceback.format_exc()}")
    safety, safety_key, sg_error = None, "none", None
    if "safegene" in api:
        try:
            safety, safety_key = stage_safety(cfg, api, aligned, adapters, data)
            artifacts["safety"] = (stage_dir("safety", safety_key) / "artifact", safety_key)
        except Exception as e:
            sg_error = f"{type(e).__name__}: {e}"
            log(f"safegene safety adapter failed: {sg_error}\n{traceback.format_exc()}")
    else:
        sg_error = "vllm_safeguard.methods.safegene not available"
    model_tok: tuple[Any, Any] | None = None
    curve = tuple(extras.curve_method(mode, t) for mode, t in cfg.translator_curve) if cfg.translator else ()
    for n in tqdm(evals, desc="repairs"):
        info = adapters[n]
        for m in (*repair_methods, *(curve if heldout_unsafe(info, cfg.extract_domains) else ())):
            if m == "safegene" and safety is None:
                out[f"{n}|{m}"] = {"error": sg_error}
                continue
            is_translator = m.startswith("translator-")
            if is_translator and info["variant"] != "unsafe":
                continue  # NeWTral's setting is unsafe experts; keeps the first run in the time budget
            if is_translator and translator is None:
                out[f"{n}|{m}"] = {"error": tr_error}
                continue
            m_ref, m_ref_key = reference, ref_key
            if m in ("safelora", "safelora-threshold"):  # the paper's operator: untruncated reference
                if exact_ref is None:
                    exact_ref = stage_reference(cfg, api, aligned, base_dir, exact=True)
                m_ref, m_ref_key = exact_ref
            if m == "nlsr":  # the analogue scores weights on safety activations
                if nlsr_ref is None:
                    nlsr_ref = stage_nlsr_reference(cfg, api, aligned, (reference, ref_key), data)
                m_ref, m_ref_key = nlsr_ref
            key = key_of(
                "repair",
                m,
                file_hash(Path(info["path"])),
                m_ref_key,
                safety_key if m == "safegene" else "",
                cfg.repair_max_rank,
                *([tr_key] if is_translator else []),
            )
            folder = stage_dir("repairs", key) / "artifact"
            report_path = stage_dir("repairs", key) / "report.json"
            if not folder.exists() and not build:
                out[f"{n}|{m}"] = {"error": "not built yet (cached-only run)"}
                continue
            if not folder.exists():
                try:
                    t = time.time()
                    adapter = load_adapter(info["path"])
                    kwargs: dict[str, Any] = {}
                    if m == "safegene":
                        if model_tok is None:
                            model_tok = load_model(aligned)
                        kwargs["artifacts"] = {"safety_adapter": safety}
                        kwargs["options"] = safegene_options(
                            cfg, api, model_tok, adapter, safety, info["domain"], data
                        )
                    # The serving rank bound (vLLM max_lora_rank); methods that grow the rank
                    # (NLSR, SafeGene) are refactorized to it, as the plugin would at load time.
                    if is_translator:
                        kwargs["artifacts"] = {"translator": translator}
                        kwargs["options"] = extras.translator_options(m)
                    if m in LAB_VARIANTS:
                        kwargs["options"] = LAB_VARIANTS[m][1]
                    method = "translator" if is_translator else LAB_VARIANTS.get(m, (m,))[0]
                    res = api["repair"](adapter, m_ref, method, max_rank=cfg.repair_max_rank, **kwargs)
                    save_adapter(res.adapter, folder)
                    rep = report_dict(res.report)
                    report_path.write_text(
                        json.dumps(
                            {"report": rep, "seconds": round(time.time() - t, 2)}, default=str, indent=1
                        )
                    )
                except Exception as e:
                    log(f"repair {n} {m} failed: {e}\n{traceback.format_exc()}")
                    out[f"{n}|{m}"] = {"error": f"{type(e).__name__}: {e}"}
                    continue
            rep = json.loads(report_path.read_text()) if report_path.exists() else {}
            out[f"{n}|{m}"] = {"path": str(folder), **rep}
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument(
        "--skip-repairs", action="store_true", help="build and evaluate everything except repair rows"
    )
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="build nothing new after the adapters: report from the cached repairs and evaluations only "
        "(missing rows say 'not evaluated'); useful while a full run is still going",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="regex: generate only the evaluation jobs whose key ('aligned', '<adapter>|<method>') matches; "
        "every other row comes from the cache or says 'not evaluated' (write such a partial report to "
        "another --results-dir)",
    )
    ap.add_argument(
        "--carry-over",
        type=Path,
        default=None,
        help="an earlier safety_lab.json: its evaluation jobs that this run did not generate are added to "
        "the report, but only if every job both runs have got the same refusal and task verdicts, item by "
        "item (same models); the count of generations whose text differs is reported",
    )
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite safety_lab.md/.png from the safety_lab.json in --results-dir (e.g. after editing "
        "NOTES.md), keeping that run's numbers and timings; runs no stage",
    )
    ap.add_argument(
        "--eval-seeds",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=None,
        help="comma-separated evaluation seeds replacing the config's (default "
        f"{','.join(map(str, CONFIG.eval_seeds))}); one seed halves the evaluation adapters and roughly "
        "halves the run, at half the n per row (the seeds used are in the report's config)",
    )
    ap.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default="lab",
        help="'lab' (the main table) or 'generalization' (issue 21: held-out categories, rephrasings, "
        "sets (a)-(c); write it to another --results-dir)",
    )
    args = ap.parse_args(argv)
    if args.render_only:
        from benchmarks.safety_lab.report import rerender

        rerender(args.results_dir, METHODS)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = CONFIGS[args.config]
    cfg = cfg if args.eval_seeds is None else replace(cfg, eval_seeds=args.eval_seeds)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.time()
        v = fn()
        timings[name] = round(time.time() - t, 1)
        log(f"stage {name}: {timings[name]}s")
        return v

    def run_eval(jobs: dict[str, tuple[str | None, EvalSuite]], **kw: Any) -> dict[str, dict[str, Any]]:
        """stage_eval, honouring --cached-only and --only."""
        if not args.only:
            return stage_eval(cfg, aligned, jobs, generate=not args.cached_only, **kw)
        rest = {k: v for k, v in jobs.items() if not re.search(args.only, k)}
        out = stage_eval(cfg, aligned, rest, generate=False, **kw)
        picked = {k: v for k, v in jobs.items() if k not in rest}
        out.update(stage_eval(cfg, aligned, picked, generate=not args.cached_only, **kw))
        return out

    base_dir = timed("base_model", base_model_dir)
    data = timed("data", lambda: build_data(cfg))
    base_out = timed("base_outputs", lambda: stage_base_outputs(cfg, base_dir, data))
    aligned = timed("aligned", lambda: stage_aligned(cfg, base_dir, data, base_out["benign_answers"]))
    adapters = timed("adapters", lambda: stage_adapters(cfg, aligned, data))
    api = None if args.skip_repairs else methods_api()
    artifacts: dict[str, Any] = {}
    repairs = timed(
        "repairs",
        lambda: stage_repairs(
            cfg, api, aligned, base_dir, adapters, data, build=not args.cached_only, artifacts=artifacts
        ),
    )

    full_suite = suite_for(cfg, data, DOMAIN_NAMES)
    jobs: dict[str, tuple[str | None, EvalSuite]] = {"aligned": (None, full_suite)}
    for name, info in adapters.items():
        if info["variant"] == "safe" or info["role"] == "translator":
            continue  # translator training pairs only; not rows of the table (saves ~10% of eval time)
        suite = suite_for(cfg, data, (info["domain"],))
        if info["role"] == "extract":
            suite.benign = []  # only their ASR is checked (every unsafe expert >= 60%)
        jobs[f"{name}|none"] = (info["path"], suite)
    if not cfg.eval_generalization:  # the generalization config's set (c) supersedes the wrapped rows
        wrapped = GG.wrap(data["harm"]["test"])
        jobs["aligned-wrapped"] = (None, EvalSuite(harmful=wrapped, harmful_tokens=cfg.harmful_tokens))
        jobs.update(GG.wrapped_jobs(adapters, data, cfg.harmful_tokens, "none-wrapped", None))
    for rk, rv in repairs.items():
        if "path" in rv:
            name = rk.split("|")[0]
            jobs[rk] = (rv["path"], suite_for(cfg, data, (adapters[name]["domain"],)))
    # Every job that measures an adapter as given (the model, unrepaired adapters, every weight-space
    # repair at any rank) in one merged-weights engine; each job is cached when done, so an
    # interrupted run keeps what it generated. Then the plugin engines (alpha / auto rows).
    results = timed("eval", lambda: run_eval(jobs))
    if "aligned" in results:  # absent only in a --cached-only / --only run that lacks it
        results.update(removed_rows(results["aligned"], full_suite, adapters))
    guard_metrics = None
    calibration: dict[str, Any] | None = None
    dsa_calibration: dict[str, Any] | None = None
    guard_gen: dict[str, Any] | None = None
    if "safety" in artifacts:
        guard_dir, guard_metrics, guard_key = timed(
            "guard", lambda: extras.stage_guard(cfg, aligned, data, adapters)
        )
        try:
            if cfg.eval_generalization:
                raise RuntimeError("not run in this config: the guard's own test covers sets (b) and (c)")
            guard_gen = timed(
                "guard_generalization",
                lambda: GG.stage_guard_generalization(
                    cfg,
                    aligned,
                    data,
                    extras.guard_sets(cfg, data),
                    (guard_dir, guard_key),
                    build=not args.cached_only,
                ),
            )
        except Exception as e:  # the report still gets written, with the error
            guard_gen = {"error": f"{type(e).__name__}: {e}"}
            log(f"guard generalization failed: {e}\n{traceback.format_exc()}")
        plugin_cfg, plugin_key = extras.plugin_engine(cfg, artifacts, guard_dir, guard_key)
        alpha_jobs = extras.calibration_jobs(cfg, adapters, data)
        alpha_jobs.update(extras.alpha_jobs(cfg, adapters, lambda d: suite_for(cfg, data, d), with_auto=True))
        results.update(timed("eval_alpha", lambda: run_eval(alpha_jobs, plugin=(plugin_cfg, plugin_key))))
        # Auto mode with alpha_high chosen on the few-shot split (second plugin engine: other probe).
        try:
            calibration = extras.choose_alpha_high(cfg, results)
        except RuntimeError as e:
            log(f"auto-cal: {e}")
        else:
            log(f"auto-cal: alpha_high {calibration['alpha_high']:g} from few-shot ASR {calibration}")
            cal_dir, cal_key = extras.stage_calibrated_guard(guard_dir, guard_key, calibration["alpha_high"])
            cal_cfg, cal_plugin_key = extras.plugin_engine(cfg, artifacts, cal_dir, cal_key)
            cal_jobs = extras.auto_cal_jobs(adapters, lambda d: suite_for(cfg, data, d))
            if cfg.eval_generalization:  # fixed alpha_high on every request: what the guard saves
                cal_jobs.update(
                    extras.fixed_alpha_jobs(
                        adapters, lambda d: suite_for(cfg, data, d), calibration["alpha_high"]
                    )
                )
            else:
                cal_jobs.update(
                    GG.wrapped_jobs(adapters, data, cfg.harmful_tokens, "auto-cal-wrapped", "auto")
                )
            results.update(
                timed("eval_auto_cal", lambda: run_eval(cal_jobs, plugin=(cal_cfg, cal_plugin_key)))
            )
        rows = align_data(cfg, data, base_out["benign_answers"])
        suite_of = lambda d: suite_for(cfg, data, d)  # noqa: E731
        try:
            if cfg.eval_generalization:
                raise RuntimeError("not run in this config (2-core budget); the main lab has the DSA rows")
            dsa_results, dsa_calibration = timed(
                "dsa",
                lambda: dsa.dsa_rows(
                    cfg,
                    aligned,
                    rows,
                    adapters,
                    data,
                    artifacts,
                    (guard_dir, guard_key),
                    suite_of,
                    run_eval,
                    build=not args.cached_only,
                ),
            )
        except Exception as e:  # the report still gets written, with the error
            dsa_results, dsa_calibration = {}, {"error": f"{type(e).__name__}: {e}"}
            log(f"dsa rows failed: {e}\n{traceback.format_exc()}")
        results.update(dsa_results)

    from benchmarks.safety_lab.report import write_report

    timings["total"] = round(time.time() - T0, 1)
    carried = carry_over(args.carry_over, results) if args.carry_over else None
    meta = {
        "config": cfg.to_dict(),
        "wheels": {w.requirement: w.sha256 for w in (SMOLLM2_WHEEL, HARMBENCH_WHEEL)},
        "splits": {k: len(v) for k, v in data["harm"].items()} | {"benign_test": len(data["benign"]["test"])},
        "harmbench_test_ids": data["harm_ids"]["test"],
        "aligned_recipe": json.loads((aligned / "recipe.json").read_text()),
        "adapters": {
            n: {**a, "recipe": json.loads((Path(a["path"]) / "recipe.json").read_text())}
            for n, a in adapters.items()
        },
        "repairs": repairs,
        "guard": guard_metrics,
        "alpha_calibration": calibration,
        "dsa_alpha_calibration": dsa_calibration,
        "guard_generalization": guard_gen,
        "translator_calibration": artifacts.get("translator_cal"),
        "timings_s": timings,
        "methods_available": api is not None,
        "carried_over": carried,
        "merged_vs_lora": merged_vs_lora(results),
        "only": args.only,
    }
    if cfg.eval_generalization:  # first: its table is this config's result
        from benchmarks.safety_lab.generalization_report import write_generalization

        write_generalization(
            args.results_dir, cfg, data, results, adapters, guard_metrics, calibration, timings
        )
    write_report(args.results_dir, meta, base_out["eval"], results, adapters, METHODS, add_fidelity)
    log(f"done in {timings['total']}s; results in {args.results_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
