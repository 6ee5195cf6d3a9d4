"""NeWTral translator networks: experts that shrink a module's update along its learned basis, and a router.

Semantics (per module ``m`` in layer ``l``; ``f_m`` = :meth:`ModuleView.features`, ``U_m`` the module's
translation basis, see representation.py)::

    expert_e(f_m)  -> g_e [k] in [0, g_max]                  # per-direction shrink
    w_l            = softmax(router(mean_m f_m over layer l))  # mixture weights per layer, sum 1
    g_m            = sum_e w_l[e] * g_e
    dW'_m          = dW_m - U_m diag(g_m) U_m^T dW_m           # same rank as dW_m

Surgical experts are trained toward each direction's optimal shrink toward the matched safe adapter
(weighted by how much of the update lies there, with a penalty on large edits); aggressive experts
toward an overshoot past it (strong alignment). The router is trained on fidelity to the safe
adapter plus a penalty on the compliance energy left after translation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn

from ...core.model_files import sha256_file
from ...errors import ReferenceArtifactError
from .representation import ModuleBasis, feature_dim

WEIGHTS_NAME = "translator.safetensors"
# The translation bases live in the same file, as ``basis::<module path>::u`` / ``::s``.
BASIS_PREFIX, BASIS_U, BASIS_S = "basis::", "::u", "::s"
MANIFEST_NAME = "translator.json"


class TranslatorConfig(BaseModel, extra="forbid"):
    k: int = Field(
        16, ge=1, le=64, description="Directions of the learned output basis per module the translator edits."
    )
    g_max: float = Field(
        2.0, gt=0, le=4, description="Largest per-direction shrink (1 removes a component, 2 reverses it)."
    )
    hidden: int = Field(128, ge=4, description="Hidden width of every expert MLP.")
    router_hidden: int = Field(32, ge=2, description="Hidden width of the router MLP.")
    experts: list[str] = Field(
        default_factory=lambda: ["surgical", "aggressive"],
        description="Expert kinds, in order ('surgical' or 'aggressive').",
    )
    seed: int = Field(0, description="Initialisation seed.")


class TranslatorManifest(BaseModel):
    format_version: int = 2
    config: TranslatorConfig
    model_fingerprint: str | None = Field(None, description="Base model the translator applies to.")
    reference_hash: str | None = Field(None, description="content_hash of the reference it was trained with.")
    training: dict[str, object] = Field(default_factory=dict, description="Recipe, data summary and losses.")
    content_hash: str = ""


class Expert(nn.Module):
    """MLP: features -> per-direction shrink ``g`` [k] = ``g_max * clamp(h, 0, 1)``. The output layer
    starts at zero, so an untrained expert is exactly the identity (and still has gradients at 0)."""

    def __init__(self, k: int, hidden: int, g_max: float) -> None:
        super().__init__()
        self.k, self.g_max = k, g_max
        self.net = nn.Sequential(
            nn.Linear(feature_dim(k), hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.head = nn.Linear(hidden, k)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.g_max * self.head(self.net(feats)).clamp(0.0, 1.0)


class Router(nn.Module):
    def __init__(self, k: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim(k), hidden), nn.GELU(), nn.Linear(hidden, n_experts))

    def forward(self, layer_feats: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(layer_feats), dim=-1)


class Translator(nn.Module):
    def __init__(self, config: TranslatorConfig, basis: dict[str, ModuleBasis] | None = None) -> None:
        super().__init__()
        torch.manual_seed(config.seed)
        for kind in config.experts:
            if kind not in ("surgical", "aggressive"):
                raise ValueError(f"expert kind must be 'surgical' or 'aggressive', got {kind!r}")
        self.config = config
        self.experts = nn.ModuleList(Expert(config.k, config.hidden, config.g_max) for _ in config.experts)
        self.router = Router(config.k, config.router_hidden, len(config.experts))
        #: module path -> learned translation basis (modules without one pass through unchanged)
        self.basis: dict[str, ModuleBasis] = dict(basis or {})
        for name, b in self.basis.items():
            if b.u.shape[1] != config.k or b.s.shape != (config.k,):
                raise ValueError(f"basis of {name!r} has {b.u.shape[1]} directions, config k={config.k}")

    def expert_outputs(self, feats: torch.Tensor) -> torch.Tensor:
        """``[E, M, k]`` shrinks for M modules."""
        return torch.stack([e(feats) for e in self.experts])

    def mix(
        self, feats: torch.Tensor, layer_of: torch.Tensor, mode: str = "moe"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed ``(g [M, k], weights [L, E])``; ``layer_of[m]`` = layer slot of module m.

        ``mode``: 'moe' (router), or an expert kind to use that expert alone (weights one-hot).
        """
        n_layers = int(layer_of.max()) + 1 if layer_of.numel() else 0
        sums = torch.zeros(n_layers, feats.shape[1]).index_add_(0, layer_of, feats)
        counts = torch.zeros(n_layers).index_add_(0, layer_of, torch.ones(len(layer_of))).clamp_min(1)
        if mode == "moe":
            weights = self.router(sums / counts[:, None])
        else:
            if mode not in self.config.experts:
                raise ValueError(f"mode must be 'moe' or one of {self.config.experts}, got {mode!r}")
            weights = torch.zeros(n_layers, len(self.experts))
            weights[:, self.config.experts.index(mode)] = 1.0
        gs = self.expert_outputs(feats)
        w = weights[layer_of]  # [M, E]
        return torch.einsum("me,emk->mk", w, gs), weights

    # ------------------------------------------------------------------ disk
    def save(self, folder: str | os.PathLike[str], manifest: TranslatorManifest) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (WEIGHTS_NAME + ".tmp")
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        for name, b in self.basis.items():
            tensors[f"{BASIS_PREFIX}{name}{BASIS_U}"] = b.u.contiguous()
            tensors[f"{BASIS_PREFIX}{name}{BASIS_S}"] = b.s.contiguous()
        save_file(tensors, str(tmp))
        os.replace(tmp, out / WEIGHTS_NAME)
        manifest.content_hash = sha256_file(out / WEIGHTS_NAME)
        (out / (MANIFEST_NAME + ".tmp")).write_text(manifest.model_dump_json(indent=2))
        os.replace(out / (MANIFEST_NAME + ".tmp"), out / MANIFEST_NAME)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> tuple[Translator, TranslatorManifest]:
        root = Path(folder)
        if not (root / MANIFEST_NAME).is_file() or not (root / WEIGHTS_NAME).is_file():
            raise ReferenceArtifactError(
                f"{root}: not a translator artifact ({MANIFEST_NAME} + {WEIGHTS_NAME})"
            )
        manifest = TranslatorManifest.model_validate(json.loads((root / MANIFEST_NAME).read_text()))
        if sha256_file(root / WEIGHTS_NAME) != manifest.content_hash:
            raise ReferenceArtifactError(f"{root / WEIGHTS_NAME}: sha256 does not match {MANIFEST_NAME}")
        tensors = load_file(str(root / WEIGHTS_NAME))
        basis: dict[str, ModuleBasis] = {}
        for key in [k for k in tensors if k.startswith(BASIS_PREFIX) and k.endswith(BASIS_U)]:
            name = key[len(BASIS_PREFIX) : -len(BASIS_U)]
            s_key = f"{BASIS_PREFIX}{name}{BASIS_S}"
            if s_key not in tensors:
                raise ReferenceArtifactError(f"{root / WEIGHTS_NAME}: {key} has no {s_key}")
            basis[name] = ModuleBasis(tensors.pop(key), tensors.pop(s_key))
        model = cls(manifest.config, basis)
        model.load_state_dict(tensors)
        return model.eval(), manifest
