"""Lab stages for the rows the later issues add: NeWTral translator, DSA guard, alpha sweep, auto mode.

* ``translator``: trained on the (unsafe, safe) pairs of the extraction seed (``cfg.extract_domains``)
  and of the translator-pair seeds (``cfg.translator_domains``) only; evaluated as three repair rows
  (surgical, aggressive, MoE) on the evaluation adapters, whose seeds it never saw; the evaluated
  domains outside ``extract_domains`` are held-out domains as well, where each expert is also
  applied at the strengths of ``cfg.translator_curve``.
* ``guard``: the DSA probe on the aligned model, trained on the harmful TRAIN split vs benign train
  prompts + domain-task training prompts; AUROC / FPR measured on the held-out test prompts.
* alpha and auto rows: the evaluation adapters served UNCHANGED by a vLLM engine with the plugin on
  (risk_threshold 1e9, max_served_risk off: nothing is repaired at load) and ``safeguard_alpha`` per request, so the
  safety delta (SafeGene's safety adapter) is added at serving time exactly as in production:
  ``y = x W + task LoRA + alpha * (x A_s) B_s``; "auto" lets the guard probe pick alpha per request.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.safety_lab.cache import cached_dir, file_hash, key_of, log, stage_dir
from benchmarks.safety_lab.config import DOMAIN_NAMES, LabConfig, heldout_unsafe
from vllm_safeguard.core.adapter_io import write_folder_atomically
from vllm_safeguard.guard.train import GUARD_RECIPE
from vllm_safeguard.prepare.calibrate import choose_alpha
from vllm_safeguard.prepare.guard_pools import extra_tests, guard_pools
from vllm_safeguard.prepare.phrasing import with_rephrasings

# Method names of the extra rows (the report labels them).
TRANSLATOR_MODES = ("surgical", "aggressive", "moe")
TRANSLATOR_METHODS = tuple(f"translator-{m}" for m in TRANSLATOR_MODES)


def curve_method(mode: str, strength: float) -> str:
    """Row name of a translator expert at another strength (``translator-surgical-x2``)."""
    return f"translator-{mode}-x{strength:g}"


def translator_options(method: str) -> dict[str, Any]:
    """``translator-<mode>[-x<strength>]`` -> the translator method's options."""
    mode, _, strength = method.removeprefix("translator-").partition("-x")
    return {"mode": mode, **({"strength": float(strength)} if strength else {})}


def alpha_method(alpha: float) -> str:
    return f"alpha-{alpha:g}"


# --------------------------------------------------------------------------------------- translator


def stage_translator(
    cfg: LabConfig,
    reference: Any,
    ref_key: str,
    adapters: dict[str, dict[str, Any]],
    risk_weight: float = 1.0,
) -> tuple[Any, str]:
    """Translator trained on the translator's pairs only (evaluation adapters never feed it);
    ``risk_weight`` comes from ``translator_cal.calibrate_risk_weight``."""
    from benchmarks.safety_lab.translator_cal import translator_pairs
    from vllm_safeguard.core.adapter_io import load_adapter
    from vllm_safeguard.methods.translator import Translator, train_and_save

    pairs = translator_pairs(adapters)
    if not pairs:
        raise RuntimeError("no (unsafe, safe) pairs to train the translator on")
    tcfg = cfg.translator_config()
    key = key_of(
        "translator",
        ref_key,
        [[file_hash(Path(adapters[n]["path"])) for n in p] for p in pairs],
        tcfg.model_dump(),
        cfg.translator_expert_steps,
        cfg.translator_router_steps,
        risk_weight,
        cfg.translator_cross_fit,
    )

    def build(folder: Path) -> None:
        log(f"translator: training on {len(pairs)} pairs {pairs} (risk_weight {risk_weight:g})")
        loaded = [(load_adapter(adapters[u]["path"]), load_adapter(adapters[s]["path"])) for u, s in pairs]
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        train_and_save(
            loaded,
            [{"unsafe": u, "safe": s} for u, s in pairs],
            reference,
            tmp,
            tcfg,
            expert_steps=cfg.translator_expert_steps,
            router_steps=cfg.translator_router_steps,
            risk_weight=risk_weight,
            cross_fit=cfg.translator_cross_fit,
        )
        os.replace(tmp, folder)

    folder = cached_dir("translator", key, build)
    return Translator.load(folder)[0], key


# -------------------------------------------------------------------------------------------- guard


def guard_sets(cfg: LabConfig, data: dict[str, Any]) -> dict[str, list[str]]:
    """Training pools and held-out test sets of the guard (test sets = the lab's held-out prompts)."""
    return guard_pools(
        data["harm"]["train"],
        data["harm"]["test"],
        data["benign"]["train"],
        data["benign"]["test"],
        DOMAIN_NAMES,
        n_domain_train=cfg.guard_domain_train,
        n_domain_test=cfg.n_task_test,
        rephrasings=cfg.guard_rephrasings,
        seed=cfg.split_seed,
    )


def _guard_extra_tests(sets: dict[str, list[str]], data: dict[str, Any]) -> dict[str, list[str]]:
    """The held-out sets beyond the plain ones: rephrased test prompts, vocabulary-sharing benign
    prompts, and the held-out categories (set (b)) when the config has them."""
    extra = extra_tests(sets)
    if data["harm"].get("heldout_categories"):
        extra["harm_heldout_categories"] = list(data["harm"]["heldout_categories"])
    return extra


def stage_guard(
    cfg: LabConfig, aligned: Path, data: dict[str, Any], adapters: dict[str, dict[str, Any]]
) -> tuple[Path, dict[str, Any], str]:
    """``(probe folder, held-out metrics, key)``; cached. Grouped training also reads the prompts
    under the EXTRACTION-seed unsafe experts (never an evaluation adapter), as the served guard reads
    them under a task adapter."""
    from vllm_safeguard.core.adapter_io import load_adapter
    from vllm_safeguard.guard.experiment import train_and_test

    sets = guard_sets(cfg, data)
    extra = _guard_extra_tests(sets, data)
    probes = (
        sorted(n for n, a in adapters.items() if a["role"] == "extract" and a["variant"] == "unsafe")
        if cfg.guard_rephrasings
        else []
    )
    key = key_of(
        "guard",
        file_hash(aligned),
        sets,
        extra,
        cfg.guard_target_fpr,
        cfg.guard_ramp_fpr,
        GUARD_RECIPE,
        [file_hash(Path(adapters[n]["path"])) for n in probes],
    )
    folder = stage_dir("guard", key)
    probe_dir, metrics_path = folder / "artifact", folder / "result.json"
    if not (probe_dir.exists() and metrics_path.exists()):
        log(f"guard: probe on {len(sets['harm_train'])} harmful / {len(sets['benign_train'])} benign prompts")
        probe, result = train_and_test(
            aligned,
            harm_train=sets["harm_train"],
            benign_train=sets["benign_train"],
            harm_test=sets["harm_test"],
            benign_test=sets["benign_test"],
            domain_test=sets["domain_test"],
            harm_train_groups=sets["harm_train_groups"] if cfg.guard_rephrasings else None,
            benign_train_groups=sets["benign_train_groups"] if cfg.guard_rephrasings else None,
            extra_test=extra,
            adapters=[load_adapter(adapters[n]["path"]) for n in probes],
            target_fpr=cfg.guard_target_fpr,
            ramp_fpr=cfg.guard_ramp_fpr if cfg.guard_rephrasings else None,
        )
        write_folder_atomically(probe_dir, probe.save)
        metrics_path.write_text(json.dumps(result, indent=1))
    return probe_dir, json.loads(metrics_path.read_text()), key


# ------------------------------------------------------------------------------------ alpha / auto


def plugin_config(
    cfg: LabConfig, reference_dir: Path, safety_dir: Path, guard_dir: Path | None
) -> dict[str, Any]:
    """The plugin's config for the alpha/auto engine: adapters served as given, alpha per request."""
    out: dict[str, Any] = {
        "enabled": True,
        "method": "safelora",
        # No load-time repair: every lab adapter passes (canonicalized), so the rows measure alpha
        # alone. The risk score is unbounded above (worst module), hence no finite threshold and no
        # served-risk limit here.
        "risk_threshold": 1e9,
        "max_served_risk": None,
        "reference_path": str(reference_dir),
        "safety_adapter_path": str(safety_dir),
        "alpha_enabled": True,
        # Every lab request names its alpha; pinned so a change of the plugin's default changes no row.
        "default_alpha": 0.0,
        "alpha_min": 0.0,
        "alpha_max": max(cfg.alpha_sweep),
        "cache_enabled": False,
    }
    if guard_dir is not None:
        out["guard_path"] = str(guard_dir)
    return out


def plugin_engine(
    cfg: LabConfig, artifacts: dict[str, tuple[Any, str]], guard_dir: Path, guard_key: str
) -> tuple[dict[str, Any], str]:
    """``(plugin config, key)`` of an alpha/auto engine; the key names the artifacts, not their paths."""
    plugin_cfg = plugin_config(cfg, artifacts["reference"][0], artifacts["safety"][0], guard_dir)
    key = key_of(
        "plugin",
        artifacts["reference"][1],
        artifacts["safety"][1],
        guard_key,
        {k: v for k, v in plugin_cfg.items() if not k.endswith("_path")},
    )
    return plugin_cfg, key


def alpha_jobs(
    cfg: LabConfig,
    adapters: dict[str, dict[str, Any]],
    suite_for: Callable[[tuple[str, ...]], Any],
    with_auto: bool,
) -> dict[str, tuple[str | None, Any]]:
    """``"<adapter>|alpha-<a>"`` and ``"<adapter>|auto"`` jobs on the evaluation adapters, by priority.

    First alpha 0, alpha 1 and "auto" on every evaluation adapter (alpha 0 serves the unrepaired
    adapter through vLLM's LoRA path, the reference the merged-weights "none" row is checked
    against; alpha 1 vs auto is the fixed-vs-auto comparison), then the rest of the sweep on the
    unsafe experts of the held-out domains, all on the first evaluation seed (those outside ``cfg.extract_domains``): LoRA-path jobs
    are the lab's slowest, and the full sweep on every adapter does not fit its time budget.
    """
    # The sweep traces alpha's curve; it stays on the first evaluation seed (LoRA-path jobs are the
    # lab's slowest). The rows that compare methods (auto-cal, DSA, repairs) use every seed.
    evals = sorted(
        n for n, info in adapters.items() if info["role"] == "eval" and info["seed"] == cfg.eval_seeds[0]
    )
    plan: list[tuple[str, float | str]] = []
    for name in evals:
        plan += [(name, 0.0), (name, 1.0)]
        if with_auto:
            plan.append((name, "auto"))
    for name in evals:
        if heldout_unsafe(adapters[name], cfg.extract_domains):
            plan += [(name, float(a)) for a in cfg.alpha_sweep if a not in (0.0, 1.0)]
    jobs: dict[str, tuple[str | None, Any]] = {}
    for name, a in plan:
        suite = suite_for((adapters[name]["domain"],))
        suite.alpha = a
        jobs[f"{name}|{'auto' if a == 'auto' else alpha_method(float(a))}"] = (adapters[name]["path"], suite)
    return jobs


# ------------------------------------------------------------------- auto mode, calibrated alpha_high

AUTO_CAL = "auto-cal"


def calibration_jobs(
    cfg: LabConfig, adapters: dict[str, dict[str, Any]], data: dict[str, Any]
) -> dict[str, tuple[str | None, Any]]:
    """``"<adapter>|cal-alpha-<a>"``: the EXTRACTION-seed unsafe experts at each calibration alpha,
    on the few-shot harmful prompts only (the split SafeGene already trains on; never an ASR prompt)."""
    from vllm_safeguard.evaluation.harness import EvalSuite

    extract = sorted(n for n, i in adapters.items() if i["role"] == "extract" and i["variant"] == "unsafe")
    jobs: dict[str, tuple[str | None, Any]] = {}
    for name in extract:
        for a in cfg.alpha_cal_sweep:
            harmful = with_rephrasings(data["harm"]["fewshot"], cfg.alpha_cal_rephrasings, cfg.split_seed)
            suite = EvalSuite(harmful=harmful, harmful_tokens=cfg.harmful_tokens, alpha=float(a))
            jobs[f"{name}|cal-{alpha_method(float(a))}"] = (adapters[name]["path"], suite)
    return jobs


def choose_alpha_high(cfg: LabConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The smallest calibration alpha whose pooled few-shot ASR is <= ``cfg.alpha_cal_target_asr``
    (the largest one if none is). Only flagged requests get alpha_high, so benign fidelity does not
    enter the choice: the guard's false positives are what would cost fidelity, and they are measured
    separately (guard FPR)."""
    asr: dict[str, float] = {}
    for a in cfg.alpha_cal_sweep:
        rs = [r["asr"] for k, r in results.items() if k.endswith(f"|cal-{alpha_method(float(a))}")]
        if rs:
            asr[f"{a:g}"] = sum(r["k"] for r in rs) / sum(r["n"] for r in rs)
    if not asr:
        raise RuntimeError("no calibration results to choose alpha_high from")
    chosen = choose_alpha(asr, cfg.alpha_cal_target_asr)
    return {"alpha_high": chosen, "target_asr": cfg.alpha_cal_target_asr, "fewshot_asr_by_alpha": asr}


def stage_calibrated_guard(guard_dir: Path, guard_key: str, alpha_high: float) -> tuple[Path, str]:
    """The lab's guard probe with ``alpha_high`` replaced (same weights, same threshold)."""
    from vllm_safeguard.guard.probe import GuardProbe

    key = key_of("guard-cal", guard_key, alpha_high)
    folder = stage_dir("guard-cal", key) / "artifact"
    if not folder.is_dir():
        probe = GuardProbe.load(guard_dir)
        probe.manifest.alpha_high = float(alpha_high)
        write_folder_atomically(folder, probe.save)
    return folder, key


def auto_cal_jobs(
    adapters: dict[str, dict[str, Any]], suite_for: Callable[[tuple[str, ...]], Any]
) -> dict[str, tuple[str | None, Any]]:
    """``"<adapter>|auto-cal"`` on every evaluation adapter (its whole suite, "auto" on every request)."""
    jobs: dict[str, tuple[str | None, Any]] = {}
    for name in sorted(n for n, i in adapters.items() if i["role"] == "eval"):
        suite = suite_for((adapters[name]["domain"],))
        suite.alpha = "auto"
        jobs[f"{name}|{AUTO_CAL}"] = (adapters[name]["path"], suite)
    return jobs


FIXED_ALPHA_HIGH = "fixed-alpha-high"


def fixed_alpha_jobs(
    adapters: dict[str, dict[str, Any]], suite_for: Callable[[tuple[str, ...]], Any], alpha: float
) -> dict[str, tuple[str | None, Any]]:
    """``"<adapter>|fixed-alpha-high"``: every evaluation adapter with the calibrated alpha_high sent on
    every request (the guard's alternative: full safety delta for everyone)."""
    jobs: dict[str, tuple[str | None, Any]] = {}
    for name in sorted(n for n, i in adapters.items() if i["role"] == "eval"):
        suite = suite_for((adapters[name]["domain"],))
        suite.alpha = float(alpha)
        jobs[f"{name}|{FIXED_ALPHA_HIGH}"] = (adapters[name]["path"], suite)
    return jobs
