"""NeWTral translator networks: experts that edit a module's alignment coordinates, and a router.

Semantics (per module ``m`` in layer ``l``; ``f_m`` = :meth:`ModuleView.features`)::

    expert_e(f_m)  -> (dC_e [k, k], g_e in [0, 1])          # g fixed at 0 for surgical experts
    w_l            = softmax(router(mean_m f_m over layer l))   # mixture weights per layer, sum 1
    dC_m, g_m      = sum_e w_l[e] * dC_e,  sum_e w_l[e] * g_e
    dW'_m          = dW_m + U dC_m Vh - g_m U R_left_m           (see representation.py)

Surgical experts are trained toward the matched safe adapter's coordinates (small, targeted
corrections); aggressive experts toward an overshoot past it plus a left-remainder shrink (strong
alignment). The router is trained on coordinate fidelity plus a penalty on the remaining risk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ReferenceArtifactError
from ..reference import sha256_file
from .representation import feature_dim

WEIGHTS_NAME = "translator.safetensors"
MANIFEST_NAME = "translator.json"


class TranslatorConfig(BaseModel, extra="forbid"):
    k: int = Field(8, ge=1, le=64, description="Alignment directions per module the translator edits.")
    hidden: int = Field(128, ge=4, description="Hidden width of every expert MLP.")
    router_hidden: int = Field(32, ge=2, description="Hidden width of the router MLP.")
    experts: list[str] = Field(
        default_factory=lambda: ["surgical", "aggressive"],
        description="Expert kinds, in order ('surgical' or 'aggressive').",
    )
    seed: int = Field(0, description="Initialisation seed.")


class TranslatorManifest(BaseModel):
    format_version: int = 1
    config: TranslatorConfig
    model_fingerprint: str | None = Field(None, description="Base model the translator applies to.")
    reference_hash: str | None = Field(None, description="content_hash of the reference it was trained with.")
    training: dict[str, object] = Field(default_factory=dict, description="Recipe, data summary and losses.")
    content_hash: str = ""


class Expert(nn.Module):
    """MLP: features -> (dC [k*k], g). Output layer starts at zero so an untrained expert is identity."""

    def __init__(self, k: int, hidden: int, aggressive: bool) -> None:
        super().__init__()
        self.k, self.aggressive = k, aggressive
        self.net = nn.Sequential(
            nn.Linear(feature_dim(k), hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.head = nn.Linear(hidden, k * k + 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.net(feats))
        dc = out[:, : self.k * self.k].view(-1, self.k, self.k)
        g = torch.sigmoid(out[:, -1] - 4.0) if self.aggressive else torch.zeros_like(out[:, -1])
        return dc, g


class Router(nn.Module):
    def __init__(self, k: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim(k), hidden), nn.GELU(), nn.Linear(hidden, n_experts))

    def forward(self, layer_feats: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(layer_feats), dim=-1)


class Translator(nn.Module):
    def __init__(self, config: TranslatorConfig) -> None:
        super().__init__()
        torch.manual_seed(config.seed)
        for kind in config.experts:
            if kind not in ("surgical", "aggressive"):
                raise ValueError(f"expert kind must be 'surgical' or 'aggressive', got {kind!r}")
        self.config = config
        self.experts = nn.ModuleList(
            Expert(config.k, config.hidden, kind == "aggressive") for kind in config.experts
        )
        self.router = Router(config.k, config.router_hidden, len(config.experts))

    def expert_outputs(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([E, M, k, k], [E, M])`` for M modules."""
        outs = [e(feats) for e in self.experts]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    def mix(
        self, feats: torch.Tensor, layer_of: torch.Tensor, mode: str = "moe"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixed ``(dC [M,k,k], g [M], weights [L,E])``; ``layer_of[m]`` = layer slot of module m.

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
        dcs, gs = self.expert_outputs(feats)
        w = weights[layer_of]  # [M, E]
        dc = torch.einsum("me,emij->mij", w, dcs)
        g = (w * gs.T).sum(1)
        return dc, g, weights

    # ------------------------------------------------------------------ disk
    def save(self, folder: str | os.PathLike[str], manifest: TranslatorManifest) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
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
        model = cls(manifest.config)
        model.load_state_dict(load_file(str(root / WEIGHTS_NAME)))
        return model.eval(), manifest
