"""DSA guard probe: a linear classifier on one layer's residual stream at the last prompt token.

Semantics::

    h      = residual stream after decoder layer L, at the last prompt token   # HF: hidden_states[L + 1]
    score  = sigmoid(w . ((h - mean) / std) + b)                               # in [0, 1]; 1 = harmful
    alpha  = alpha_high if score >= threshold else alpha_low                   # per request ("auto")

The probe reads a hidden state the serving forward pass computes anyway, so scoring a request
costs one dot product per prompt, no second model and no extra forward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from ..core.artifacts import ArtifactKind, Loaded
from ..core.model_files import sha256_file
from ..errors import ReferenceArtifactError

WEIGHTS_NAME = "guard.safetensors"
MANIFEST_NAME = "guard.json"


class GuardManifest(BaseModel):
    format_version: int = 1
    layer: int = Field(description="Decoder layer L whose output residual stream the probe reads.")
    hidden_size: int
    threshold: float = Field(description="Score at or above which a request is flagged.")
    alpha_low: float = Field(0.0, description="Alignment strength for requests below the threshold.")
    alpha_high: float = Field(1.0, description="Alignment strength for flagged requests.")
    model_fingerprint: str | None = None
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Validation AUROC, FPR, TPR at threshold."
    )
    layer_auroc: dict[int, float] = Field(
        default_factory=dict, description="Validation AUROC of every layer tried."
    )
    training: dict[str, object] = Field(default_factory=dict)
    content_hash: str = ""


@dataclass
class GuardProbe:
    weight: torch.Tensor  # [hidden]
    bias: torch.Tensor  # []
    mean: torch.Tensor  # [hidden]
    std: torch.Tensor  # [hidden]
    manifest: GuardManifest

    @property
    def layer(self) -> int:
        return self.manifest.layer

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` residual-stream states -> ``[n]`` scores in [0, 1]."""
        z = (hidden.float() - self.mean) / self.std
        return torch.sigmoid(z @ self.weight + self.bias)

    def alpha_for(self, score: float) -> float:
        m = self.manifest
        return m.alpha_high if score >= m.threshold else m.alpha_low

    def save(self, folder: str | os.PathLike[str]) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias.reshape(1), "mean": self.mean, "std": self.std}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, out / WEIGHTS_NAME)
        self.manifest.content_hash = sha256_file(out / WEIGHTS_NAME)
        (out / (MANIFEST_NAME + ".tmp")).write_text(self.manifest.model_dump_json(indent=2))
        os.replace(out / (MANIFEST_NAME + ".tmp"), out / MANIFEST_NAME)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> GuardProbe:
        root = Path(folder)
        if not (root / MANIFEST_NAME).is_file() or not (root / WEIGHTS_NAME).is_file():
            raise ReferenceArtifactError(f"{root}: not a guard probe ({MANIFEST_NAME} + {WEIGHTS_NAME})")
        manifest = GuardManifest.model_validate_json((root / MANIFEST_NAME).read_text())
        if sha256_file(root / WEIGHTS_NAME) != manifest.content_hash:
            raise ReferenceArtifactError(f"{root / WEIGHTS_NAME}: sha256 does not match {MANIFEST_NAME}")
        t = load_file(str(root / WEIGHTS_NAME))
        if t["weight"].shape != (manifest.hidden_size,):
            raise ReferenceArtifactError(
                f"{root}: probe weight shape {tuple(t['weight'].shape)} != hidden_size"
            )
        return cls(t["weight"], t["bias"][0], t["mean"], t["std"], manifest)


def auroc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half)."""
    if scores_pos.numel() == 0 or scores_neg.numel() == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    greater = (scores_pos[:, None] > scores_neg[None, :]).float().sum()
    ties = (scores_pos[:, None] == scores_neg[None, :]).float().sum()
    return float((greater + 0.5 * ties) / (scores_pos.numel() * scores_neg.numel()))


def _load_artifact(folder: str) -> Loaded:
    probe = GuardProbe.load(folder)
    return Loaded(probe, probe.manifest.content_hash)


#: The guard probe artifact: enables ``safeguard_alpha="auto"`` (found like the other artifacts).
GUARD = ArtifactKind(
    name="guard",
    path_field="guard_path",
    load=_load_artifact,
    what="a DSA guard probe",
    how="`vllm-safeguard prepare` (or `vllm-safeguard guard train`)",
)
