"""Alignment reference ("safety subspace") store.

For every targetable linear module, ``V = W_aligned - W_base`` is kept as an energy-truncated SVD
``V ~= U diag(S) Vh`` (``U: [out, k]`` orthonormal, ``S: [k]``, ``Vh: [k, in]``). Repair methods use
only these factors: the SafeLoRA projector ``U U^T`` is applied as ``U (U^T B)``, so the ``out x out``
matrix is never materialized.

On disk: ``reference.safetensors`` (``<module>.U``, ``.S``, ``.Vh``) + ``manifest.json``
(model identity, per-module rank and energy kept, sha256 of the tensor file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import ReferenceArtifactError
from .artifacts import ArtifactKind, Loaded
from .lowrank import truncated_svd
from .model_files import model_fingerprint, read_tensor, sha256_file, weight_index

FORMAT_VERSION = 1
TENSORS_NAME = "reference.safetensors"
MANIFEST_NAME = "manifest.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModuleManifest(BaseModel):
    rank: int = Field(description="Kept singular directions k.")
    energy_kept: float = Field(description="sum(S[:k]^2) / ||V||_F^2.")
    total_energy: float = Field(description="||V||_F^2 (squared Frobenius norm of the full delta).")
    gram_error: float | None = Field(
        None,
        description="||VV^T - U S^2 U^T||_F / ||VV^T||_F = sqrt(sum_{i>k} s_i^4 / sum_i s_i^4): how far the "
        "truncated factors are from SafeLoRA's operator VV^T/||V||_F (0 when untruncated; None: not recorded).",
    )
    shape: tuple[int, int] = Field(description="(out_features, in_features) of the module.")


class ReferenceManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    aligned_model: str = Field(description="Path (as given) of the aligned model at build time.")
    base_model: str = Field(description="Path (as given) of the base/unaligned model at build time.")
    model_fingerprint: str = Field(description="model_fingerprint() of the aligned model.")
    energy_target: float
    max_rank: int
    modules: dict[str, ModuleManifest]
    safety_tokens: int = Field(
        0,
        description="Response tokens of the safety samples behind the per-module input Grams "
        "(``<module>.G``, see vllm_safeguard.core.activations; 0: none recorded, `nlsr` cannot run).",
    )
    content_hash: str = Field("", description="sha256 of reference.safetensors.")
    created_unix: float = 0.0


@dataclass
class ModuleSubspace:
    """``V ~= U diag(S) Vh`` for one module; ``total_energy`` is ``||V||_F^2`` of the untruncated delta
    (None: take ``sum(S^2)``, exact when nothing was truncated)."""

    name: str
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total_energy: float | None = None
    input_gram: torch.Tensor | None = None  # [k, k] Vh (X^T X / n) Vh^T on safety samples, if recorded

    @property
    def delta_norm(self) -> float:
        """``||V||_F`` of the full alignment delta."""
        total = self.total_energy if self.total_energy is not None else float((self.s.double() ** 2).sum())
        return total**0.5

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def dense(self) -> torch.Tensor:
        """``[out, in]`` truncated delta. For tests and small models only."""
        return (self.u * self.s) @ self.vh


@dataclass
class AlignmentReference:
    modules: dict[str, ModuleSubspace]
    manifest: ReferenceManifest

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        aligned_dir: str | os.PathLike[str],
        base_dir: str | os.PathLike[str],
        *,
        energy: float = 0.9,
        max_rank: int = 64,
        targets: Iterable[str] = DEFAULT_TARGETS,
        progress: bool = True,
    ) -> AlignmentReference:
        """Compute per-module ``V = W_aligned - W_base`` and keep its energy-truncated SVD.

        Weights are streamed one module at a time with ``safe_open`` (peak memory: two weights).
        Modules where the two models are identical are skipped (nothing to protect there).
        """
        if not 0.0 < energy <= 1.0:
            raise ReferenceArtifactError(f"energy must be in (0, 1], got {energy!r}")
        if max_rank < 1:
            raise ReferenceArtifactError(f"max_rank must be >= 1, got {max_rank!r}")
        targets = tuple(targets)
        aligned = weight_index(Path(aligned_dir))
        base = weight_index(Path(base_dir))
        names = sorted(n for n in aligned if n.endswith(".weight") and n[:-7].rsplit(".", 1)[-1] in targets)
        if not names:
            raise ReferenceArtifactError(f"no target modules {targets} found in {aligned_dir}")
        modules: dict[str, ModuleSubspace] = {}
        metas: dict[str, ModuleManifest] = {}
        for name in tqdm(names, desc="reference: SVD of W_aligned - W_base", disable=not progress):
            if name not in base:
                raise ReferenceArtifactError(f"{base_dir}: weight {name!r} missing in the base model")
            wa, wb = read_tensor(aligned[name], name), read_tensor(base[name], name)
            if wa.shape != wb.shape:
                raise ReferenceArtifactError(
                    f"{name}: aligned shape {tuple(wa.shape)} != base shape {tuple(wb.shape)} (different models?)"
                )
            delta = wa.float() - wb.float()
            u, s, vh, kept, total = truncated_svd(delta, energy=energy, max_rank=max_rank)
            if total == 0.0:
                continue
            module = name[: -len(".weight")]
            modules[module] = ModuleSubspace(module, u, s, vh, total)
            metas[module] = ModuleManifest(
                rank=s.numel(),
                energy_kept=kept,
                total_energy=total,
                gram_error=gram_truncation_error(delta, s),
                shape=(int(wa.shape[0]), int(wa.shape[1])),
            )
        if not modules:
            raise ReferenceArtifactError(f"{aligned_dir} and {base_dir} have identical target weights")
        manifest = ReferenceManifest(
            aligned_model=str(aligned_dir),
            base_model=str(base_dir),
            model_fingerprint=model_fingerprint(aligned_dir),
            energy_target=energy,
            max_rank=max_rank,
            modules=metas,
            created_unix=time.time(),
        )
        return cls(modules, manifest)

    # ------------------------------------------------------------------ disk
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write atomically (temp folder + rename); fills ``manifest.content_hash``."""
        target = Path(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tensors: dict[str, torch.Tensor] = {}
            for name, m in self.modules.items():
                tensors[f"{name}.U"] = m.u.contiguous()
                tensors[f"{name}.S"] = m.s.contiguous()
                tensors[f"{name}.Vh"] = m.vh.contiguous()
                if m.input_gram is not None:
                    tensors[f"{name}.G"] = m.input_gram.contiguous()
            save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "vllm_safeguard.core.reference"})
            self.manifest.content_hash = sha256_file(tmp / TENSORS_NAME)
            (tmp / MANIFEST_NAME).write_text(self.manifest.model_dump_json(indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, verify: bool = True) -> AlignmentReference:
        root = Path(folder)
        mpath, tpath = root / MANIFEST_NAME, root / TENSORS_NAME
        if not mpath.is_file() or not tpath.is_file():
            raise ReferenceArtifactError(
                f"{root}: not a reference folder (needs {MANIFEST_NAME} and {TENSORS_NAME})"
            )
        try:
            manifest = ReferenceManifest.model_validate_json(mpath.read_text())
        except ValueError as e:
            raise ReferenceArtifactError(f"{mpath}: invalid manifest: {e}") from e
        if manifest.format_version != FORMAT_VERSION:
            raise ReferenceArtifactError(
                f"{mpath}: format_version {manifest.format_version} is not {FORMAT_VERSION}"
            )
        if verify and sha256_file(tpath) != manifest.content_hash:
            raise ReferenceArtifactError(f"{tpath}: sha256 does not match the manifest (corrupt or tampered)")
        modules: dict[str, ModuleSubspace] = {}
        with safe_open(str(tpath), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name, meta in manifest.modules.items():
                u, s, vh = (f.get_tensor(f"{name}.{p}").float() for p in ("U", "S", "Vh"))
                if u.shape != (meta.shape[0], meta.rank) or vh.shape != (meta.rank, meta.shape[1]):
                    raise ReferenceArtifactError(f"{tpath}: {name} factors do not match the manifest shapes")
                gram = f.get_tensor(f"{name}.G").float() if f"{name}.G" in keys else None
                if gram is not None and gram.shape != (meta.rank, meta.rank):
                    raise ReferenceArtifactError(f"{tpath}: {name}.G does not match the manifest rank")
                modules[name] = ModuleSubspace(name, u, s, vh, meta.total_energy, gram)
        return cls(modules, manifest)

    def record_safety_activations(
        self,
        model_dir: str | os.PathLike[str],
        samples: Sequence[tuple[str, str]],
        *,
        progress: bool = True,
    ) -> None:
        """Add each module's input Gram on ``(prompt, safe response)`` samples (what ``nlsr`` scores
        safety-critical weights with); ``model_dir`` is the aligned model. Call before :meth:`save`."""
        from .activations import safety_input_grams

        grams, tokens = safety_input_grams(
            model_dir, {n: m.vh for n, m in self.modules.items()}, samples, progress=progress
        )
        for name, gram in grams.items():
            self.modules[name].input_gram = gram
        self.manifest.safety_tokens = tokens

    def check_model(self, model_dir: str | os.PathLike[str]) -> None:
        """Refuse to serve with a reference built for another model architecture."""
        fp = model_fingerprint(model_dir)
        if fp != self.manifest.model_fingerprint:
            raise ReferenceArtifactError(
                f"reference was built for model fingerprint {self.manifest.model_fingerprint[:12]}, "
                f"but {model_dir} has {fp[:12]}"
            )


def gram_truncation_error(delta: torch.Tensor, kept_s: torch.Tensor, *, exact_limit: int = 2048) -> float:
    """``sqrt(sum_{i>k} s_i^4 / sum_i s_i^4)`` of ``delta`` for the ``k`` kept singular values ``kept_s``.

    Up to ``exact_limit`` on the short side the spectrum is recomputed in float64 (the tail is summed,
    not found as a difference, so a full reference reads 0, not float32 noise). Above it,
    ``sum_i s_i^4 = ||G||_F^2`` for the Gram ``G`` of the short side, so no full SVD is needed.
    """
    d = delta.double()
    k = int(kept_s.numel())
    if min(d.shape) <= exact_limit:
        s4 = torch.linalg.svdvals(d) ** 4
        total4 = float(s4.sum())
        return (float(s4[k:].sum()) / total4) ** 0.5 if total4 > 0.0 else 0.0
    gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
    total4 = float((gram**2).sum())
    if total4 == 0.0:
        return 0.0
    tail4 = max(0.0, total4 - float((kept_s.double() ** 4).sum()))
    return (tail4 / total4) ** 0.5


def _load_artifact(folder: str) -> Loaded:
    ref = AlignmentReference.load(folder)
    return Loaded(ref, ref.manifest.content_hash)


#: The alignment reference artifact: every repair method and the risk score read it.
REFERENCE = ArtifactKind(
    name="reference",
    path_field="reference_path",
    load=_load_artifact,
    what="alignment reference",
    how="`vllm-safeguard prepare --base ...` (or `vllm-safeguard reference build`)",
)
