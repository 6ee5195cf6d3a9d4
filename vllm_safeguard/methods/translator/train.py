"""Training the translator on (unsafe adapter, safe adapter) pairs of the same domain and seed.

First the translation basis of every module is fitted to the pairs' corrections (representation.py).
Stage 1 trains each expert alone (surgical: toward each direction's optimal shrink ``g*`` with a
small-edit penalty; aggressive: toward ``g* + overshoot``). Stage 2 freezes the experts and trains the
router on fidelity to the safe adapter plus ``risk_weight * risk`` (the compliance energy left after
translation). Every loss is in the factor-free view: ``sum_j e_j (g_j - g*_j)^2`` is exactly the
squared distance of the translated update to the safe one inside the basis, relative to ``||dW||^2``
(up to a constant), so a pair of 30-layer adapters is ~200 small samples.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...core.adapter import LoRAAdapter, layer_index
from ...core.reference import AlignmentReference
from .model import Translator, TranslatorConfig, TranslatorManifest
from .representation import ModuleBasis, fit_basis, n_layers_of, optimal_shrink, view_module


@dataclass
class PairDataset:
    feats: torch.Tensor  # [M, F]
    energy: torch.Tensor  # [M, k] share of each unsafe update along each basis direction
    sv: torch.Tensor  # [M, k] basis spectrum / sigma_1
    g_star: torch.Tensor  # [M, k] per-direction shrink that best maps unsafe onto safe (clamped)
    group: torch.Tensor  # [M] (pair, layer) slot for routing
    pair: torch.Tensor  # [M] index of the pair the module comes from
    basis: dict[str, ModuleBasis] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.feats.shape[0])


def fit_bases(pairs: Sequence[tuple[LoRAAdapter, LoRAAdapter]], k: int) -> dict[str, ModuleBasis]:
    """A translation basis for every module that every unsafe and safe adapter of the pairs has."""
    shared = set(pairs[0][0].modules) if pairs else set()
    for unsafe, safe in pairs:
        shared &= set(unsafe.modules) & set(safe.modules)
    return {
        name: fit_basis([(u.modules[name], s.modules[name]) for u, s in pairs], k)
        for name in sorted(shared, key=lambda n: (layer_index(n) or 0, n))
    }


def build_dataset(
    pairs: Sequence[tuple[LoRAAdapter, LoRAAdapter]], k: int, g_max: float = 2.0, *, cross_fit: bool = True
) -> PairDataset:
    """Module views and shrink targets of every (unsafe, safe) pair; ``basis`` (what the trained
    translator carries) is fitted to all the pairs.

    ``cross_fit`` (needs >= 2 pairs): each pair is viewed, and its shrink targets computed, in a basis
    fitted to the OTHER pairs. At repair time the adapter never helped fit the basis; a pair viewed
    in a basis fitted to itself looks unlike that (its correction fills the top directions, so
    shrinking them is always right), and experts and router trained on such views learn to shrink
    too much of an unseen adapter's task skill.
    """
    basis = fit_bases(pairs, k)
    if not basis:
        raise ValueError("no module is shared by every adapter of the pairs")
    n_layers = n_layers_of(list(basis))
    feats, energy, sv, gs, group, pair, names = [], [], [], [], [], [], []
    for p, (unsafe, safe) in enumerate(pairs):
        own = basis
        if cross_fit and len(pairs) > 1:
            own = fit_bases([q for i, q in enumerate(pairs) if i != p], k)
        for name in basis:
            b = own[name]
            view = view_module(unsafe.modules[name], b, n_layers)
            feats.append(view.features())
            energy.append(view.energy)
            sv.append(view.sv)
            gs.append(optimal_shrink(unsafe.modules[name], safe.modules[name], b).clamp(0.0, g_max))
            group.append(p * n_layers + (layer_index(name) or 0))
            pair.append(p)
            names.append(name)
    _, slots = torch.unique(torch.tensor(group), return_inverse=True)
    return PairDataset(
        torch.stack(feats),
        torch.stack(energy),
        torch.stack(sv),
        torch.stack(gs),
        slots,
        torch.tensor(pair),
        basis,
        names,
    )


def distance_per_module(g: torch.Tensor, data: PairDataset, target: torch.Tensor) -> torch.Tensor:
    """``[..., M]``: ``sum_j e_j (g_j - target_j)^2`` per module, for shrinks ``g`` [..., M, k]."""
    return (data.energy * (g - target) ** 2).sum(-1)


def risk_per_module(g: torch.Tensor, data: PairDataset) -> torch.Tensor:
    """``[..., M]``: compliance energy left after the shrink, weighted by each direction's importance,
    ``sum_j sv_j^2 e_j max(1 - g_j, 0)^2`` per module (a reversed component counts 0)."""
    return (data.sv**2 * data.energy * (1.0 - g).clamp_min(0.0) ** 2).sum(-1)


def router_loss_per_module(g: torch.Tensor, data: PairDataset, risk_weight: float) -> torch.Tensor:
    """``[..., M]``: the router's loss per module (fidelity to the safe adapter + weighted risk)."""
    return distance_per_module(g, data, data.g_star) + risk_weight * risk_per_module(g, data)


def shrink_distance(g: torch.Tensor, data: PairDataset, target: torch.Tensor) -> torch.Tensor:
    """Mean over modules of :func:`distance_per_module`."""
    return distance_per_module(g, data, target).mean()


def risk_left(g: torch.Tensor, data: PairDataset) -> torch.Tensor:
    """Mean over modules of :func:`risk_per_module`."""
    return risk_per_module(g, data).mean()


def train_translator(
    data: PairDataset,
    config: TranslatorConfig,
    *,
    expert_steps: int = 400,
    router_steps: int = 200,
    lr: float = 3e-3,
    overshoot: float = 0.5,
    edit_penalty: float = 1e-2,
    risk_weight: float = 1.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> tuple[Translator, dict[str, list[float]]]:
    """Train experts, then the router. Returns the model (with the dataset's basis) and the loss history."""
    model = Translator(config, data.basis)
    history: dict[str, list[float]] = {}
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    for e, (kind, expert) in enumerate(zip(config.experts, model.experts, strict=True)):
        opt = torch.optim.Adam(expert.parameters(), lr=lr)
        if kind == "surgical":
            target, penalty = data.g_star, edit_penalty
        else:
            target, penalty = (data.g_star + overshoot).clamp(0.0, config.g_max), 0.0
        losses = history.setdefault(f"expert{e}_{kind}", [])
        for step in tqdm(range(expert_steps), desc=f"translator: expert {kind}", disable=not progress):
            opt.zero_grad()
            g = expert(data.feats)
            loss = shrink_distance(g, data, target) + penalty * (data.energy * g**2).sum(1).mean()
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
        g, _ = model.mix(data.feats, data.group, "moe")
        loss = shrink_distance(g, data, data.g_star) + risk_weight * risk_left(g, data)
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
    cross_fit: bool = True,
    progress: bool = True,
) -> tuple[Translator, TranslatorManifest, dict[str, list[float]]]:
    """Build the dataset, train, and save the artifact (manifest records the recipe and losses).

    ``reference`` names the base model the translator applies to (its fingerprint goes into the
    manifest). Used by ``vllm-safeguard translator train`` and the safety lab, so both write the same
    artifact.
    """
    data = build_dataset(pairs, config.k, config.g_max, cross_fit=cross_fit)
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
            "cross_fit": cross_fit,
            "final_losses": {k_: v[-1] for k_, v in history.items()},
        },
    )
    model.save(out, manifest)
    return model, manifest, history
