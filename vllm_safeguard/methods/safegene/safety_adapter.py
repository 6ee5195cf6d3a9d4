"""SafeGene: a reusable low-rank safety adapter, data-aware layer selection, few-shot recalibration.

1. Extraction. The safety vector is ``W_aligned - W_degraded`` per module, where the degraded model
   is the aligned model with harmful adapter(s) merged. With adapters this is exactly
   ``-mean_i s_i B_i A_i``; it is compressed to rank ``r_s`` (truncated SVD through the factors) and
   stored once per base model as a PEFT LoRA folder plus ``safegene.json``. From two model folders
   (:func:`extract_from_models`) the dense difference is SVD-truncated instead.
2. Data-aware layer selection. On a small probe set (harmful prompts, optionally benign ones as a
   contrast) the relative output change the safety vector causes in each module,
   ``||x A_s^T B_s^T|| / ||x W^T||``, is averaged per layer; the top layers are kept.
3. Few-shot recalibration. For one task adapter, per-layer coefficients ``c_l`` (init 1) are fitted by
   gradient descent on a handful of (harmful -> refusal) and (task prompt -> task answer) pairs with
   the model computing ``W + dW_task + sum_l c_l dW_safety_l``; only the ``c_l`` are trained.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from ...core.adapter import LoRAAdapter, LoRAModule, layer_index
from ...core.adapter_io import WEIGHTS_NAME, load_adapter, save_adapter
from ...core.artifacts import ArtifactKind, Loaded
from ...core.lowrank import refactorize, truncated_svd
from ...core.model_files import model_fingerprint, read_tensor, sha256_file, weight_index
from ...core.reference import DEFAULT_TARGETS
from ...errors import ReferenceArtifactError

MANIFEST_NAME = "safegene.json"


class SafetyManifest(BaseModel):
    format_version: int = 1
    rank: int = Field(description="Rank r_s of every safety module.")
    layers: list[int] = Field(description="Transformer layers the safety adapter acts on (after selection).")
    sources: list[str] = Field(default_factory=list, description="What the safety vector was extracted from.")
    energy_kept: dict[str, float] = Field(default_factory=dict, description="Per-module energy kept at r_s.")
    layer_scores: dict[int, float] = Field(default_factory=dict, description="Data-aware selection scores.")
    model_fingerprint: str | None = None
    content_hash: str = ""


@dataclass
class SafetyAdapter:
    """The reusable safety delta: ``dW_safety = B_s A_s`` per module (scaling folded, = 1)."""

    adapter: LoRAAdapter
    manifest: SafetyManifest

    @property
    def layers(self) -> set[int]:
        return set(self.manifest.layers)

    def module(self, name: str) -> LoRAModule | None:
        mod = self.adapter.modules.get(name)
        if mod is None or layer_index(name) not in self.layers:
            return None
        return mod

    def restrict(self, layers: Sequence[int], scores: dict[int, float] | None = None) -> SafetyAdapter:
        manifest = self.manifest.model_copy(deep=True)
        manifest.layers = sorted(set(layers))
        if scores is not None:
            manifest.layer_scores = dict(scores)
        return SafetyAdapter(self.adapter, manifest)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        out = save_adapter(self.adapter, folder)
        self.manifest.content_hash = sha256_file(out / WEIGHTS_NAME)
        (out / MANIFEST_NAME).write_text(self.manifest.model_dump_json(indent=2))
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, verify: bool = True) -> SafetyAdapter:
        root = Path(folder)
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            raise ReferenceArtifactError(f"{root}: not a SafeGene safety adapter (no {MANIFEST_NAME})")
        manifest = SafetyManifest.model_validate_json(mpath.read_text())
        if verify and sha256_file(root / WEIGHTS_NAME) != manifest.content_hash:
            raise ReferenceArtifactError(f"{root / WEIGHTS_NAME}: sha256 does not match {MANIFEST_NAME}")
        return cls(load_adapter(root), manifest)


def _load_artifact(folder: str) -> Loaded:
    safety = SafetyAdapter.load(folder)
    return Loaded(safety, safety.manifest.content_hash)


#: The safety adapter artifact: needed by method 'safegene' and by the serving-time alpha path.
SAFETY_ADAPTER = ArtifactKind(
    name="safety_adapter",
    path_field="safety_adapter_path",
    load=_load_artifact,
    what="a safety adapter",
    how="`vllm-safeguard prepare` (or `vllm-safeguard safety-vector extract`)",
)


def merge_safety_into_adapter(
    task: LoRAAdapter | None, safety: SafetyAdapter, alpha: float = 1.0
) -> LoRAAdapter:
    """``task`` (or None for the base model) with ``alpha`` x the safety delta appended as extra rank,
    as one plain LoRA adapter: what the serving path computes for a token, offline.

    Semantics: per module m in the safety adapter's selected layers (and every module of ``task``):
        A = [A_t ; A_s],  B = [s_t * B_t, alpha * s_s * B_s],  scaling 1
    """
    names = set(task.modules if task is not None else ()) | {
        n for n in safety.adapter.modules if safety.module(n) is not None
    }
    modules: dict[str, LoRAModule] = {}
    for name in sorted(names):
        parts_a, parts_b = [], []
        t = task.modules.get(name) if task is not None else None
        s = safety.module(name)
        if t is not None:
            parts_a.append(t.lora_a.float())
            parts_b.append(t.lora_b.float() * t.scaling)
        if s is not None:
            parts_a.append(s.lora_a.float())
            parts_b.append(s.lora_b.float() * (s.scaling * alpha))
        modules[name] = LoRAModule(name, torch.cat(parts_a, 0), torch.cat(parts_b, 1), 1.0)
    base_cfg = dict(task.config) if task is not None else dict(safety.adapter.config)
    return LoRAAdapter(config=base_cfg, modules=modules)


def _safety_config(rank: int, targets: set[str]) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "use_rslora": False,
        "use_dora": False,
    }


def extract_safety_adapter(
    aligned_dir: str | os.PathLike[str] | None,
    degraded_adapters: Sequence[LoRAAdapter],
    *,
    rank: int = 8,
    progress: bool = True,
) -> SafetyAdapter:
    """Safety vector ``W_aligned - W_degraded = -mean_i dW_i`` from harmful adapters, at rank ``rank``.

    ``aligned_dir`` (optional) only records the model fingerprint the artifact belongs to.
    """
    if not degraded_adapters:
        raise ReferenceArtifactError("need at least one harmful adapter to extract a safety vector")
    n = len(degraded_adapters)
    parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    for ad in degraded_adapters:
        for name, mod in ad.modules.items():
            parts[name][0].append(-mod.scaled_b() / n)
            parts[name][1].append(mod.lora_a)
    modules: dict[str, LoRAModule] = {}
    kept: dict[str, float] = {}
    for name, (bs, as_) in tqdm(
        sorted(parts.items()), desc="safegene: compress safety vector", disable=not progress
    ):
        b, a, e = refactorize(torch.cat(bs, 1), torch.cat(as_, 0), rank)
        b, a = _pad_rank(b, a, rank)
        modules[name] = LoRAModule(name, a, b, 1.0)
        kept[name] = e
    targets = {n.rsplit(".", 1)[-1] for n in modules}
    layers = sorted({x for x in (layer_index(n) for n in modules) if x is not None})
    manifest = SafetyManifest(
        rank=rank,
        layers=layers,
        sources=[ad.source or "<in-memory>" for ad in degraded_adapters],
        energy_kept=kept,
        model_fingerprint=model_fingerprint(aligned_dir) if aligned_dir else None,
    )
    return SafetyAdapter(LoRAAdapter(_safety_config(rank, targets), modules), manifest)


def extract_from_models(
    aligned_dir: str | os.PathLike[str],
    degraded_dir: str | os.PathLike[str],
    *,
    rank: int = 8,
    targets: Sequence[str] = DEFAULT_TARGETS,
    progress: bool = True,
) -> SafetyAdapter:
    """Safety vector from two model folders: rank-``rank`` SVD of ``W_aligned - W_degraded``."""
    aligned, degraded = weight_index(Path(aligned_dir)), weight_index(Path(degraded_dir))
    names = sorted(n for n in aligned if n.endswith(".weight") and n[:-7].rsplit(".", 1)[-1] in targets)
    modules: dict[str, LoRAModule] = {}
    kept: dict[str, float] = {}
    for name in tqdm(names, desc="safegene: SVD of W_aligned - W_degraded", disable=not progress):
        if name not in degraded:
            raise ReferenceArtifactError(f"{degraded_dir}: weight {name!r} missing")
        u, s, vh, e, total = truncated_svd(
            read_tensor(aligned[name], name) - read_tensor(degraded[name], name), energy=1.0, max_rank=rank
        )
        if total == 0.0:
            continue
        b, a = _pad_rank(u * s, vh, rank)
        module = name[: -len(".weight")]
        modules[module] = LoRAModule(module, a, b, 1.0)
        kept[module] = e
    if not modules:
        raise ReferenceArtifactError(f"{aligned_dir} and {degraded_dir} do not differ in any target module")
    layers = sorted({x for x in (layer_index(n) for n in modules) if x is not None})
    manifest = SafetyManifest(
        rank=rank,
        layers=layers,
        sources=[str(degraded_dir)],
        energy_kept=kept,
        model_fingerprint=model_fingerprint(aligned_dir),
    )
    targets_used = {n.rsplit(".", 1)[-1] for n in modules}
    return SafetyAdapter(LoRAAdapter(_safety_config(rank, targets_used), modules), manifest)


def from_trained_lora(
    lora: LoRAAdapter, *, aligned_dir: str | os.PathLike[str] | None = None, source: str | None = None
) -> SafetyAdapter:
    """A safety adapter from a LoRA *trained* for safety on the aligned model (DSA's safety adapter).

    Semantics::

        for every module of ``lora``:  B_s = scaling * B,  A_s = A   (scaling folded; rank padded to max r)
        layers = every transformer layer the LoRA adapts (no selection, no recalibration)

    so the plugin's alpha path adds ``alpha * B_s A_s``, i.e. ``alpha`` times the trained update.
    """
    if not lora.modules:
        raise ReferenceArtifactError("the trained safety LoRA has no modules")
    rank = max(m.rank for m in lora.modules.values())
    modules: dict[str, LoRAModule] = {}
    for name, mod in lora.modules.items():
        b, a = _pad_rank(mod.lora_b.float() * mod.scaling, mod.lora_a.float(), rank)
        modules[name] = LoRAModule(name, a, b, 1.0)
    manifest = SafetyManifest(
        rank=rank,
        layers=sorted({x for x in (layer_index(n) for n in modules) if x is not None}),
        sources=[source or lora.source or "<in-memory>"],
        model_fingerprint=model_fingerprint(aligned_dir) if aligned_dir else None,
    )
    targets = {n.rsplit(".", 1)[-1] for n in modules}
    return SafetyAdapter(LoRAAdapter(_safety_config(rank, targets), modules), manifest)


def _pad_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors to exactly ``rank`` (one uniform rank keeps the PEFT folder simple)."""
    k = b.shape[1]
    if k >= rank:
        return b[:, :rank].contiguous(), a[:rank].contiguous()
    return torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1), torch.cat(
        [a, a.new_zeros(rank - k, a.shape[1])], 0
    )


# ----------------------------------------------------------------------------- model-side helpers


def _chat_prompt(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


class _DeltaHooks:
    """Forward hooks adding ``x dW^T`` for a task adapter and coefficient-scaled safety deltas."""

    def __init__(
        self,
        model: torch.nn.Module,
        task: LoRAAdapter | None,
        safety: SafetyAdapter,
        coeffs: dict[int, torch.Tensor] | None,
    ) -> None:
        self.handles = []
        names = set(safety.adapter.modules) | set(task.modules if task else {})
        for name in names:
            try:
                target = model.get_submodule(name)
            except AttributeError:
                continue
            t = task.modules.get(name) if task else None
            s = safety.module(name)
            if t is None and s is None:
                continue
            self.handles.append(target.register_forward_hook(self._hook(t, s, coeffs, layer_index(name))))

    @staticmethod
    def _hook(
        t: LoRAModule | None, s: LoRAModule | None, coeffs: dict[int, torch.Tensor] | None, layer: int | None
    ):
        def fn(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0].float()
            add = torch.zeros_like(out, dtype=torch.float32)
            if t is not None:
                add = add + (x @ t.lora_a.T) @ t.scaled_b().T
            if s is not None:
                c = coeffs[layer] if coeffs is not None and layer in coeffs else 1.0
                add = add + c * ((x @ s.lora_a.T) @ s.scaled_b().T)
            return out + add.to(out.dtype)

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def layer_effects(
    model: torch.nn.Module, tokenizer: Any, safety: SafetyAdapter, prompts: Sequence[str]
) -> dict[int, float]:
    """Mean relative output change ``||x dW_s^T|| / ||x W^T||`` of the safety vector per layer."""
    sums: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    handles = []
    for name, mod in safety.adapter.modules.items():
        layer = layer_index(name)
        if layer is None:
            continue
        target = model.get_submodule(name)

        def hook(_m, inputs, out, mod=mod, layer=layer):
            x = inputs[0].float()
            delta = (x @ mod.lora_a.T) @ mod.scaled_b().T
            sums[layer] += float(delta.norm() / out.float().norm().clamp_min(1e-12))
            counts[layer] += 1

        handles.append(target.register_forward_hook(hook))
    try:
        for p in prompts:
            ids = tokenizer(_chat_prompt(tokenizer, p), return_tensors="pt", add_special_tokens=False)
            model(**ids)
    finally:
        for h in handles:
            h.remove()
    return {layer: sums[layer] / counts[layer] for layer in sums}


def select_layers(
    model: torch.nn.Module,
    tokenizer: Any,
    safety: SafetyAdapter,
    probe_prompts: Sequence[str],
    *,
    keep: float = 0.5,
    benign_prompts: Sequence[str] | None = None,
) -> SafetyAdapter:
    """Keep the ``keep`` share of layers where the safety vector moves harmful-probe activations most
    (minus its effect on benign probes when given, so layers that act on everything rank lower)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    scores = layer_effects(model, tokenizer, safety, probe_prompts)
    if benign_prompts:
        benign = layer_effects(model, tokenizer, safety, benign_prompts)
        scores = {k: v - benign.get(k, 0.0) for k, v in scores.items()}
    n = max(1, round(keep * len(scores)))
    chosen = sorted(scores, key=lambda k: -scores[k])[:n]
    return safety.restrict(chosen, scores)


def _encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    eos = tokenizer.eos_token or ""
    for prompt, answer in pairs:
        p_ids = tokenizer(_chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer + eos, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        labels = torch.tensor([[-100] * len(p_ids) + a_ids])
        out.append((ids, labels))
    return out


def recalibrate(
    model: torch.nn.Module,
    tokenizer: Any,
    task_adapter: LoRAAdapter,
    safety: SafetyAdapter,
    harmful_refusal_pairs: Sequence[tuple[str, str]],
    task_pairs: Sequence[tuple[str, str]],
    *,
    steps: int = 20,
    lr: float = 0.1,
    task_weight: float = 1.0,
    max_coefficient: float = 4.0,
    progress: bool = True,
    losses: list[float] | None = None,
) -> dict[int, float]:
    """Fit per-layer safety coefficients for one task adapter (few-shot, only ``c_l`` trained).

    ``losses``, when given, receives the training loss of every step.
    """
    layers = sorted(safety.layers)
    params = torch.nn.Parameter(torch.ones(len(layers)))
    coeffs = {layer: params[i] for i, layer in enumerate(layers)}
    for p in model.parameters():
        p.requires_grad_(False)
    harm = _encode_pairs(tokenizer, harmful_refusal_pairs)
    task = _encode_pairs(tokenizer, task_pairs)
    opt = torch.optim.Adam([params], lr=lr)
    hooks = _DeltaHooks(model, task_adapter, safety, coeffs)
    try:
        for _ in tqdm(range(steps), desc="safegene: recalibrate coefficients", disable=not progress):
            opt.zero_grad()
            loss = sum(model(input_ids=i, labels=y).loss for i, y in harm) / max(len(harm), 1)
            if task:
                loss = loss + task_weight * sum(model(input_ids=i, labels=y).loss for i, y in task) / len(
                    task
                )
            loss.backward()  # type: ignore[union-attr]
            if losses is not None:
                losses.append(float(loss.detach()))  # type: ignore[union-attr]
            opt.step()
            with torch.no_grad():
                params.clamp_(0.0, max_coefficient)
    finally:
        hooks.remove()
    return {layer: float(params[i].detach()) for i, layer in enumerate(layers)}


def coefficients_json(coeffs: dict[int, float]) -> str:
    return json.dumps({str(k): v for k, v in sorted(coeffs.items())})
