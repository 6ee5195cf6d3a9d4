"""Training the translator on (unsafe adapter, safe adapter) pairs of the same domain and seed.

Stage 1 trains each expert alone (surgical: toward the safe coordinates with a small-edit penalty;
aggressive: toward an overshoot ``C_s + overshoot (C_s - C_u)`` and a left-remainder shrink). Stage 2
freezes the experts and trains the router on fidelity to the safe coordinates plus
``risk_weight * risk(C')`` (the anti-alignment left after translation). Everything runs on the
factor-free module views, so a pair of 30-layer adapters is ~200 small samples.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapter import LoRAAdapter, layer_index
from ..reference import AlignmentReference
from .model import Translator, TranslatorConfig, TranslatorManifest
from .representation import left_overlap, view_module


@dataclass
class PairDataset:
    feats: torch.Tensor  # [M, F]
    coords_u: torch.Tensor  # [M, k, k] normalized by s_1
    coords_s: torch.Tensor  # [M, k, k]
    sv: torch.Tensor  # [M, k]
    g_star: torch.Tensor  # [M] best scalar shrink of the unsafe left remainder toward the safe one
    group: torch.Tensor  # [M] (pair, layer) slot for routing
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.feats.shape[0])


def n_layers_of(reference: AlignmentReference) -> int:
    layers = [layer_index(n) for n in reference.modules]
    return max((x for x in layers if x is not None), default=0) + 1


def build_dataset(
    pairs: Sequence[tuple[LoRAAdapter, LoRAAdapter]], reference: AlignmentReference, k: int
) -> PairDataset:
    """Module views of every (unsafe, safe) pair on the modules both adapters and the reference share."""
    n_layers = n_layers_of(reference)
    feats, cu, cs, sv, gs, group, names = [], [], [], [], [], [], []
    for p, (unsafe, safe) in enumerate(pairs):
        for name, mod_u in unsafe.modules.items():
            sub, mod_s = reference.modules.get(name), safe.modules.get(name)
            if sub is None or mod_s is None:
                continue
            vu = view_module(mod_u, sub, k, n_layers)
            vs = view_module(mod_s, sub, k, n_layers)
            lu, cross = left_overlap(mod_u, mod_s, sub, k)
            feats.append(vu.features())
            cu.append(vu.coords)
            cs.append(vs.coords * (vs.scale / vu.scale))
            sv.append(vu.sv)
            gs.append(min(max(1.0 - cross / lu, 0.0), 1.0) if lu > 0 else 0.0)
            group.append(p * n_layers + (layer_index(name) or 0))
            names.append(name)
    if not feats:
        raise ValueError("no module is shared by the pairs and the reference")
    _, slots = torch.unique(torch.tensor(group), return_inverse=True)
    return PairDataset(
        torch.stack(feats), torch.stack(cu), torch.stack(cs), torch.stack(sv), torch.tensor(gs), slots, names
    )


def risk_of(coords: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """Risk (see risk.py) of normalized coordinates ``[M, k, k]`` given spectra ``[M, k]``."""
    diag = torch.diagonal(coords, dim1=1, dim2=2)
    undone = (sv * torch.minimum((-diag).clamp(min=0), sv)).sum(1)
    return undone / (sv**2).sum(1).clamp_min(1e-12)


def train_translator(
    data: PairDataset,
    config: TranslatorConfig,
    *,
    expert_steps: int = 400,
    router_steps: int = 200,
    lr: float = 3e-3,
    overshoot: float = 0.5,
    edit_penalty: float = 1e-3,
    risk_weight: float = 1.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> tuple[Translator, dict[str, list[float]]]:
    """Train experts, then the router. Returns the model and the loss history per stage."""
    model = Translator(config)
    history: dict[str, list[float]] = {}
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    for e, (kind, expert) in enumerate(zip(config.experts, model.experts, strict=True)):
        opt = torch.optim.Adam(expert.parameters(), lr=lr)
        if kind == "surgical":
            target_c, target_g = data.coords_s, None
        else:
            target_c = data.coords_s + overshoot * (data.coords_s - data.coords_u)
            target_g = (data.g_star + overshoot).clamp(0, 1)
        losses = history.setdefault(f"expert{e}_{kind}", [])
        for step in tqdm(range(expert_steps), desc=f"translator: expert {kind}", disable=not progress):
            opt.zero_grad()
            dc, g = expert(data.feats)
            loss = ((data.coords_u + dc - target_c) ** 2).mean() + edit_penalty * (dc**2).mean()
            if target_g is not None:
                loss = loss + ((g - target_g) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if ckpt and (step + 1) % checkpoint_every == 0:
                _checkpoint(model, config, ckpt, history)
    for p in model.experts.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.router.parameters(), lr=lr)
    losses = history.setdefault("router", [])
    for step in tqdm(range(router_steps), desc="translator: router", disable=not progress):
        opt.zero_grad()
        dc, _, _ = model.mix(data.feats, data.group, "moe")
        new = data.coords_u + dc
        loss = ((new - data.coords_s) ** 2).mean() + risk_weight * risk_of(new, data.sv).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if ckpt and (step + 1) % checkpoint_every == 0:
            _checkpoint(model, config, ckpt, history)
    for p in model.experts.parameters():
        p.requires_grad_(True)
    return model.eval(), history


def _checkpoint(
    model: Translator, config: TranslatorConfig, folder: Path, history: dict[str, list[float]]
) -> None:
    summary = {k: v[-1] for k, v in history.items() if v}
    model.save(
        folder,
        TranslatorManifest(
            config=config, training={"checkpoint": True, "last_losses": summary, "time": time.time()}
        ),
    )


def train_and_save(
    pairs: Sequence[tuple[LoRAAdapter, LoRAAdapter]],
    pair_names: Sequence[dict[str, str]],
    reference: AlignmentReference,
    out: str | os.PathLike[str],
    config: TranslatorConfig,
    *,
    expert_steps: int = 400,
    router_steps: int = 200,
    lr: float = 3e-3,
    risk_weight: float = 1.0,
    progress: bool = True,
) -> tuple[Translator, TranslatorManifest, dict[str, list[float]]]:
    """Build the dataset, train, and save the artifact (manifest records the recipe and losses).

    Used by ``vllm-safeguard translator train`` and the safety lab, so both write the same artifact.
    """
    data = build_dataset(pairs, reference, config.k)
    model, history = train_translator(
        data,
        config,
        expert_steps=expert_steps,
        router_steps=router_steps,
        lr=lr,
        risk_weight=risk_weight,
        checkpoint_dir=Path(out) / "checkpoints",
        progress=progress,
    )
    manifest = TranslatorManifest(
        config=config,
        model_fingerprint=reference.manifest.model_fingerprint,
        reference_hash=reference.manifest.content_hash,
        training={
            "pairs": [dict(p) for p in pair_names],
            "modules": len(data),
            "expert_steps": expert_steps,
            "router_steps": router_steps,
            "lr": lr,
            "risk_weight": risk_weight,
            "final_losses": {k_: v[-1] for k_, v in history.items()},
        },
    )
    model.save(out, manifest)
    return model, manifest, history
