"""DSA's own safety adapter: a LoRA *trained* on the aligned model, served as the alpha delta.

The lab's other alpha rows add SafeGene's *extracted* safety vector (aligned minus the extraction
experts). DSA trains a safety adapter on the served model and scales it at inference; here that is a
LoRA trained on the aligned model with the alignment's own rows (refusals on the harmful training
prompts, the base model's answers on the benign ones; the same data the aligned model was tuned on,
never a test prompt), converted with ``safegene.from_trained_lora`` and given to the plugin as its
``safety_adapter_path``. Rows: ``dsa-alpha-1`` (fixed alpha 1 on every request) and ``dsa-auto-cal``
(the lab's guard, alpha_high calibrated on the few-shot split exactly as for ``auto-cal``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.safety_lab import extras
from benchmarks.safety_lab.cache import cached_dir, file_hash, key_of, log, stage_dir
from benchmarks.safety_lab.config import LabConfig
from vllm_safeguard.prepare.train import SFTExample, train_lora

DSA_ALPHA = "dsa-alpha-1"
DSA_AUTO_CAL = "dsa-auto-cal"
METHODS = (DSA_ALPHA, DSA_AUTO_CAL)
_CAL = "|dsa-cal-"


def stage_dsa_adapter(
    cfg: LabConfig, aligned: Path, rows: Sequence[SFTExample], *, build: bool = True
) -> tuple[Path, str]:
    """``(safety adapter folder, key)``: the trained LoRA in the plugin's safety-adapter format
    (``build=False``: only from the cache, else RuntimeError)."""
    from vllm_safeguard.core.adapter_io import load_adapter, write_folder_atomically
    from vllm_safeguard.methods.safegene import from_trained_lora

    lora_key = key_of("dsa-lora", file_hash(aligned), [asdict(r) for r in rows], asdict(cfg.lora_recipe))

    def train(folder: Path) -> None:
        if not build:
            raise RuntimeError("DSA safety LoRA not built yet (cached-only run)")
        log(f"dsa: safety LoRA on the aligned model, {len(rows)} rows ({cfg.lora_recipe.steps} steps)")
        train_lora(aligned, folder, rows, cfg.lora_recipe)

    lora_dir = cached_dir("dsa-lora", lora_key, train)
    key = key_of("dsa", lora_key)
    folder = stage_dir("dsa", key) / "artifact"
    if not folder.is_dir():
        safety = from_trained_lora(
            load_adapter(lora_dir), aligned_dir=aligned, source=f"dsa-lora {lora_key[:12]}"
        )
        write_folder_atomically(folder, safety.save)
    return folder, key


def dsa_rows(
    cfg: LabConfig,
    aligned: Path,
    rows: Sequence[SFTExample],
    adapters: dict[str, dict[str, Any]],
    data: dict[str, Any],
    artifacts: dict[str, tuple[Any, str]],
    guard: tuple[Path, str],
    suite_for: Callable[[tuple[str, ...]], Any],
    run_eval: Callable[..., dict[str, dict[str, Any]]],
    *,
    build: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Results of the DSA rows (``<adapter>|dsa-*``) and the DSA adapter's alpha calibration."""
    dsa_dir, dsa_key = stage_dsa_adapter(cfg, aligned, rows, build=build)
    engine_artifacts = {**artifacts, "safety": (dsa_dir, dsa_key)}
    guard_dir, guard_key = guard
    plugin = extras.plugin_engine(cfg, engine_artifacts, guard_dir, guard_key)
    jobs = {k.replace("|cal-", _CAL): v for k, v in extras.calibration_jobs(cfg, adapters, data).items()}
    for name in sorted(n for n, i in adapters.items() if i["role"] == "eval"):
        suite = suite_for((adapters[name]["domain"],))
        suite.alpha = 1.0
        jobs[f"{name}|{DSA_ALPHA}"] = (adapters[name]["path"], suite)
    results = run_eval(jobs, plugin=plugin)
    try:
        calibration = extras.choose_alpha_high(
            cfg, {k.replace(_CAL, "|cal-"): v for k, v in results.items() if _CAL in k}
        )
    except RuntimeError as e:
        log(f"dsa auto-cal: {e}")
        return results, None
    log(f"dsa auto-cal: alpha_high {calibration['alpha_high']:g} from few-shot ASR {calibration}")
    cal_dir, cal_key = extras.stage_calibrated_guard(guard_dir, guard_key, calibration["alpha_high"])
    cal_plugin = extras.plugin_engine(cfg, engine_artifacts, cal_dir, cal_key)
    cal_jobs = {
        k.replace(f"|{extras.AUTO_CAL}", f"|{DSA_AUTO_CAL}"): v
        for k, v in extras.auto_cal_jobs(adapters, suite_for).items()
    }
    results.update(run_eval(cal_jobs, plugin=cal_plugin))
    return results, calibration
