"""DSA guard probe: a linear classifier on one layer's residual stream at the last prompt token.

Semantics::

    h      = residual stream after decoder layer L, at the last prompt token   # HF: hidden_states[L + 1]
    score  = sigmoid(w . ((h - mean) / std) + b)                               # in [0, 1]; 1 = harmful
    alpha  = alpha_high                                       if score >= threshold
             alpha_low + (alpha_high - alpha_low) * ramp      otherwise        # per request ("auto")
    ramp   = clamp((logit(score) - logit(ramp_low)) / (logit(threshold) - logit(ramp_low)), 0, 1)
             (0 when ramp_low is None: the two-level switch)

The ramp is the fail-safe part: a prompt the guard is unsure about (between ramp_low, set at a
higher benign FPR, and the threshold) gets part of the safety delta instead of none.

The probe reads a hidden state the serving forward pass computes anyway, so scoring a request
costs one dot product per prompt, no second model and no extra forward pass.
"""

from __future__ import annotations

import math
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
    threshold: float = Field(description="Score at or above which a request is flagged (gets alpha_high).")
    ramp_low: float | None = Field(
        None,
        description="Score where alpha starts rising from alpha_low; it reaches alpha_high at the threshold "
        "(linear in logit(score)). None: the two-level switch.",
    )
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
        """The alpha of a request with this score (module Semantics; the op computes the same)."""
        m = self.manifest
        if score >= m.threshold:
            return m.alpha_high
        if m.ramp_low is None or m.ramp_low >= m.threshold or score <= m.ramp_low:
            return m.alpha_low
        lo, hi = _logit(m.ramp_low), _logit(m.threshold)
        return m.alpha_low + (m.alpha_high - m.alpha_low) * min(1.0, (_logit(score) - lo) / (hi - lo))

    def decision(self) -> list[float]:
        """The op's decision buffer ``[threshold, alpha_low, alpha_high, ramp_low]`` (no ramp: the
        threshold itself, which makes the ramp empty)."""
        m = self.manifest
        ramp = m.threshold if m.ramp_low is None else min(m.ramp_low, m.threshold)
        return [m.threshold, m.alpha_low, m.alpha_high, ramp]

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


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


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
