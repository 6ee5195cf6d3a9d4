"""Train a guard probe on a real model and measure it on held-out prompts (AUROC, FPR at threshold).

Shared by ``benchmarks/bench_guard.py`` and the safety lab, so both report the same quantities.

Semantics::

    states[k] = last_token_states(model, prompts[k])            # [n, n_layers, hidden]
    with training groups (registers):
        probe = train_guard_grouped(...)                        # layer + threshold on held-out registers
    without:
        shuffle harm_train, benign_train (seeded); the first val_fraction of each -> validation
        probe = train_guard(train, validation)                  # layer by val AUROC, threshold at target FPR
    for each held-out set: scores = probe.score(states[set][:, probe.layer])
    auroc(harmful_test, benign_test + domain_test), TPR/FPR at probe.threshold
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_safeguard.core.merge import merged_into
from vllm_safeguard.core.model_files import model_fingerprint
from vllm_safeguard.guard.probe import GuardProbe, auroc
from vllm_safeguard.guard.train import last_token_states, train_guard, train_guard_grouped


def fit_probe(
    harm: torch.Tensor,
    benign: torch.Tensor,
    *,
    val_fraction: float,
    target_fpr: float,
    seed: int,
    fingerprint: str | None,
) -> GuardProbe:
    """The probe on already shuffled ``[n, n_layers, hidden]`` states: the first ``val_fraction`` of
    each class validates (layer choice, threshold at ``target_fpr``), the rest trains."""
    nv_h, nv_b = max(1, int(len(harm) * val_fraction)), max(1, int(len(benign) * val_fraction))
    tr = torch.cat([harm[nv_h:], benign[nv_b:]])
    ytr = torch.tensor([1] * (len(harm) - nv_h) + [0] * (len(benign) - nv_b))
    va = torch.cat([harm[:nv_h], benign[:nv_b]])
    yva = torch.tensor([1] * nv_h + [0] * nv_b)
    return train_guard(tr, ytr, va, yva, target_fpr=target_fpr, seed=seed, model_fingerprint=fingerprint)


def train_and_test(
    model_dir: str | os.PathLike[str],
    *,
    harm_train: Sequence[str],
    benign_train: Sequence[str],
    harm_test: Sequence[str],
    benign_test: Sequence[str],
    domain_test: Sequence[str] = (),
    harm_train_groups: Sequence[str] | None = None,
    benign_train_groups: Sequence[str] | None = None,
    extra_test: Mapping[str, Sequence[str]] | None = None,
    adapters: Sequence[Any] = (),
    val_fraction: float = 0.25,
    target_fpr: float = 0.05,
    ramp_fpr: float | None = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> tuple[GuardProbe, dict[str, Any]]:
    """Fit the probe on the training pools; return it and its held-out metrics (scores included).

    With ``*_train_groups`` (the register of each training prompt) the probe is chosen on held-out
    registers (:func:`train_guard_grouped`, with the fail-safe ramp); without, on a random
    ``val_fraction`` split (:func:`fit_probe`). ``extra_test``: more held-out sets by name; a name
    starting with ``harm`` is harmful (its TPR is reported), any other benign (its FPR).
    ``adapters`` (LoRA adapters, grouped training only): the training prompts are also read with each
    adapter merged into the model, as the served forward pass reads them under a task adapter (the
    guard scores the adapted model): the first issue-21 guard, trained on the bare model, chose layer
    28 and flagged 82% of test prompts there but almost none under the unsafe experts (auto ASR 97%).
    Test sets are scored on the bare model and, when adapters are given, under each adapter too.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    grouped = harm_train_groups is not None and benign_train_groups is not None
    h_tr, b_tr = list(harm_train), list(benign_train)
    if not grouped:
        rng = random.Random(seed)
        rng.shuffle(h_tr)
        rng.shuffle(b_tr)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    t0 = time.perf_counter()
    sets = {"harm_train": h_tr, "ben_train": b_tr, "harm_test": harm_test, "ben_test": benign_test}
    if domain_test:
        sets["dom_test"] = domain_test
    for name, prompts in (extra_test or {}).items():
        sets[f"{name}_test"] = list(prompts)
    states = {k: last_token_states(model, tok, list(v), progress=progress) for k, v in sets.items()}
    adapted: list[dict[str, torch.Tensor]] = []
    for adapter in adapters if grouped else ():
        with merged_into(model, adapter):
            adapted.append(
                {k: last_token_states(model, tok, list(v), progress=progress) for k, v in sets.items()}
            )
    feature_s = time.perf_counter() - t0
    del model
    selection: dict[str, Any] | None = None
    fingerprint = model_fingerprint(Path(model_dir))
    if grouped:
        assert harm_train_groups is not None and benign_train_groups is not None
        copies = [states, *adapted]  # the bare model's states and each adapter's, same labels and folds
        probe, selection = train_guard_grouped(
            torch.cat([torch.cat([c["harm_train"], c["ben_train"]]) for c in copies]),
            torch.tensor(([1] * len(h_tr) + [0] * len(b_tr)) * len(copies)),
            (list(harm_train_groups) + list(benign_train_groups)) * len(copies),
            target_fpr=target_fpr,
            ramp_fpr=ramp_fpr,
            seed=seed,
            model_fingerprint=fingerprint,
        )
    else:
        probe = fit_probe(
            states["harm_train"],
            states["ben_train"],
            val_fraction=val_fraction,
            target_fpr=target_fpr,
            seed=seed,
            fingerprint=fingerprint,
        )
    thr = probe.manifest.threshold
    scores = {k: probe.score(states[k][:, probe.layer]) for k in sets if k.endswith("_test")}
    neg = torch.cat([scores["ben_test"], scores.get("dom_test", torch.empty(0))])
    test: dict[str, Any] = {
        "n_harmful": len(harm_test),
        "n_benign": len(benign_test),
        "n_domain": len(domain_test),
        "auroc_harmful_vs_benign_and_domain": auroc(scores["harm_test"], neg),
        "auroc_harmful_vs_benign": auroc(scores["harm_test"], scores["ben_test"]),
        "tpr_at_threshold": float((scores["harm_test"] >= thr).float().mean()),
        "fpr_benign_at_threshold": float((scores["ben_test"] >= thr).float().mean()),
    }
    if domain_test:
        test["fpr_domain_at_threshold"] = float((scores["dom_test"] >= thr).float().mean())
    for name in extra_test or {}:
        s = scores[f"{name}_test"]
        rate = float((s >= thr).float().mean())
        test[f"{'tpr' if name.startswith('harm') else 'fpr'}_{name}_at_threshold"] = rate
        test[f"mean_alpha_{name}"] = sum(probe.alpha_for(float(v)) for v in s) / max(1, s.numel())
        test[f"n_{name}"] = int(s.numel())
    if adapted:  # the same held-out sets under each harmful adapter (what serving scores)
        under: dict[str, Any] = {}
        for name in [k for k in sets if k.endswith("_test")]:
            sc = torch.cat([probe.score(a[name][:, probe.layer]) for a in adapted])
            key = "tpr" if name.startswith("harm") else "fpr"
            under[f"{key}_{name.removesuffix('_test')}_at_threshold"] = float((sc >= thr).float().mean())
            under[f"n_{name.removesuffix('_test')}"] = int(sc.numel())
        test["under_adapters"] = under
    result = {
        "layer": probe.layer,
        "threshold": thr,
        "ramp_low": probe.manifest.ramp_low,
        "validation": probe.manifest.metrics,
        "layer_auroc_validation": probe.manifest.layer_auroc,
        "selection": selection,
        "test": test,
        "target": {"auroc_min": 0.95},
        "feature_seconds": feature_s,
        "prompts": {k: list(v) for k, v in sets.items() if k.endswith("_test")},
        "scores": {k: v.tolist() for k, v in scores.items()},
    }
    return probe, result
