"""The builders of ``prepare``'s stages (``build_<stage>(plan, folder)``) and its manifest."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .. import __version__
from .guard_pools import extra_tests, guard_pools
from .inputs import probe_examples
from .plan import MANIFEST, Plan, load_probes, probe_adapter_dirs

GUARD_METRICS = "guard_metrics.json"
CALIBRATION = "calibration.json"


def build_probe_adapters(plan: Plan, folder: Path) -> None:
    """One harmful LoRA per probe domain, trained on the aligned model (what an attacker's fine-tune
    does to it: the raw material of the safety adapter and of the alpha calibration)."""
    from .train import train_lora

    if plan.probe_sources:  # the operator's own harmful adapters: copied, never trained
        for src, path in zip(plan.probe_sources, probe_adapter_dirs(plan), strict=True):
            shutil.copytree(src, folder / path.name)
        return
    for domain, path in zip(plan.options.probe_domains, probe_adapter_dirs(plan), strict=True):
        train_lora(
            plan.model,
            folder / path.name,
            probe_examples(plan.options, plan.inputs, domain),
            plan.options.probe_recipe(),
        )


def build_reference(plan: Plan, folder: Path) -> None:
    from ..core.reference import AlignmentReference

    assert plan.base is not None
    ref = AlignmentReference.build(
        plan.model, plan.base, energy=plan.options.reference_energy, max_rank=plan.options.reference_max_rank
    )
    ref.save(folder)


def _model(plan: Plan) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(plan.model))
    return AutoModelForCausalLM.from_pretrained(str(plan.model), dtype=torch.float32).eval(), tok


def build_safety_adapter(plan: Plan, folder: Path) -> None:
    """SafeGene's safety adapter from the probe adapters; layers chosen on the few-shot harmful prompts
    (benign training prompts discount layers that act on everything), as in the lab."""
    from ..methods.safegene import extract_safety_adapter, select_layers

    safety = extract_safety_adapter(plan.model, load_probes(plan), rank=plan.options.safety_rank)
    model, tok = _model(plan)
    safety = select_layers(
        model,
        tok,
        safety,
        plan.inputs.harm["fewshot"],
        keep=plan.options.safety_keep,
        benign_prompts=plan.inputs.benign["train"][:16],
    )
    safety.save(folder)


def guard_sets(plan: Plan) -> dict[str, list[str]]:
    """Training pools and held-out test sets of the guard (the lab's, :func:`data.guard_pools`)."""
    o, inp = plan.options, plan.inputs
    return guard_pools(
        inp.harm["train"],
        inp.harm["test"],
        inp.benign["train"],
        inp.benign["test"],
        o.guard_domains,
        n_domain_train=o.guard_domain_train,
        rephrasings=o.guard_rephrasings,
        seed=o.split_seed,
    )


def build_guard(plan: Plan, folder: Path) -> None:
    """The guard probe: chosen on held-out registers of the rephrased pools (guard_rephrasings > 0),
    its training prompts also read under each harmful probe adapter (what serving scores under a
    task adapter), with the fail-safe ramp; its held-out metrics include unseen wordings."""
    from ..guard.experiment import train_and_test

    o = plan.options
    sets = guard_sets(plan)
    grouped = o.guard_rephrasings > 0
    extra = extra_tests(sets)
    probe, result = train_and_test(
        plan.model,
        harm_train=sets["harm_train"],
        benign_train=sets["benign_train"],
        harm_test=sets["harm_test"],
        benign_test=sets["benign_test"],
        domain_test=sets["domain_test"],
        harm_train_groups=sets["harm_train_groups"] if grouped else None,
        benign_train_groups=sets["benign_train_groups"] if grouped else None,
        extra_test=extra,
        adapters=load_probes(plan) if grouped else (),
        target_fpr=o.guard_target_fpr,
        ramp_fpr=o.guard_ramp_fpr if grouped else None,
    )
    probe.save(folder)
    keep = ("layer", "threshold", "ramp_low", "validation", "test", "feature_seconds")
    (folder / GUARD_METRICS).write_text(json.dumps({k: result[k] for k in keep}, indent=1))


def build_calibration(plan: Plan, folder: Path) -> None:
    """The guard with ``alpha_high`` calibrated (calibrate.py); the plugin reads this folder."""
    from ..guard.probe import GuardProbe
    from ..methods.safegene import SafetyAdapter
    from .calibrate import calibrate_alpha_high
    from .phrasing import with_rephrasings

    o = plan.options
    cal = calibrate_alpha_high(
        plan.model,
        load_probes(plan),
        SafetyAdapter.load(plan.stage("safety_adapter").output),
        with_rephrasings(plan.inputs.harm["fewshot"], o.alpha_cal_rephrasings, o.split_seed),
        sweep=o.alpha_cal_sweep,
        target_asr=o.alpha_cal_target_asr,
        max_tokens=o.harmful_tokens,
    )
    probe = GuardProbe.load(plan.stage("guard").output)
    probe.manifest.alpha_high = float(cal["alpha_high"])
    probe.save(folder)
    src = plan.stage("guard").output / GUARD_METRICS
    (folder / GUARD_METRICS).write_text(src.read_text())
    (folder / CALIBRATION).write_text(json.dumps(cal, indent=1))


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def manifest(plan: Plan, timings: dict[str, float]) -> dict[str, Any]:
    """What was built for which model, from which data and seeds, and how good it measured."""
    artifacts: dict[str, Any] = {}
    not_built: dict[str, str] = {}
    for st in plan.stages:
        if st.name in ("probe_adapters", "guard"):
            continue  # intermediate: the plugin reads reference, safety_adapter and guard (= calibration)
        kind = "guard" if st.name == "calibration" else st.name
        if st.skipped:
            not_built[kind] = st.skipped
        elif st.output.is_dir():
            artifacts[kind] = {"path": str(st.output), "key": st.key}
    not_built["translator"] = (
        "not built by prepare (method 'translator' needs `vllm-safeguard translator train`)"
    )
    guard_dir = plan.stage("calibration").output
    guard = _read(guard_dir / GUARD_METRICS)
    cal = _read(guard_dir / CALIBRATION)
    safety = _read(plan.stage("safety_adapter").output / "safegene.json")
    o = plan.options
    return {
        "format": 1,
        "vllm_safeguard": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"path": str(plan.model), "weights_sha256": plan.model_hash},
        "base": str(plan.base) if plan.base else None,
        "artifacts": artifacts,
        "not_built": not_built,
        "data": {
            **plan.inputs.source,
            "digest": plan.inputs.digest(),
            "sizes": {
                **{f"harmful_{k}": len(v) for k, v in plan.inputs.harm.items()},
                **{f"benign_{k}": len(v) for k, v in plan.inputs.benign.items()},
            },
        },
        "probe_adapters": [str(p) for p in plan.probe_sources]
        or "trained by prepare (probe_domains, probe_seed)",
        "seeds": {
            "split": o.split_seed,
            "probe_adapters": o.probe_seed,
            "guard": 0,
            "guard_domain_train": 777,
        },
        "options": o.model_dump(mode="json"),
        "quality": {
            "guard": None
            if guard is None
            else {
                "layer": guard["layer"],
                "threshold": guard["threshold"],
                "ramp_low": guard.get("ramp_low"),
                "heldout": guard["test"],
                "validation": guard["validation"],
            },
            "alpha_calibration": cal,
            "safety_adapter": None
            if safety is None
            else {"rank": safety.get("rank"), "layers": safety.get("layers")},
        },
        "timings_s": timings,
        "manifest_file": MANIFEST,
    }
