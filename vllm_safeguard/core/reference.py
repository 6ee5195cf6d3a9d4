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
from collections.abc import Iterable
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
    shape: tuple[int, int] = Field(description="(out_features, in_features) of the module.")


class ReferenceManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    aligned_model: str = Field(description="Path (as given) of the aligned model at build time.")
    base_model: str = Field(description="Path (as given) of the base/unaligned model at build time.")
    model_fingerprint: str = Field(description="model_fingerprint() of the aligned model.")
    energy_target: float
    max_rank: int
    modules: dict[str, ModuleManifest]
    content_hash: str = Field("", description="sha256 of reference.safetensors.")
    created_unix: float = 0.0


@dataclass
class ModuleSubspace:
    """``V ~= U diag(S) Vh`` for one module."""

    name: str
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

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
            u, s, vh, kept, total = truncated_svd(wa - wb, energy=energy, max_rank=max_rank)
            if total == 0.0:
                continue
            module = name[: -len(".weight")]
            modules[module] = ModuleSubspace(module, u, s, vh)
            metas[module] = ModuleManifest(
                rank=s.numel(),
                energy_kept=kept,
                total_energy=total,
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
            for name, meta in manifest.modules.items():
                u, s, vh = (f.get_tensor(f"{name}.{p}").float() for p in ("U", "S", "Vh"))
                if u.shape != (meta.shape[0], meta.rank) or vh.shape != (meta.rank, meta.shape[1]):
                    raise ReferenceArtifactError(f"{tpath}: {name} factors do not match the manifest shapes")
                modules[name] = ModuleSubspace(name, u, s, vh)
        return cls(modules, manifest)

    def check_model(self, model_dir: str | os.PathLike[str]) -> None:
        """Refuse to serve with a reference built for another model architecture."""
        fp = model_fingerprint(model_dir)
        if fp != self.manifest.model_fingerprint:
            raise ReferenceArtifactError(
                f"reference was built for model fingerprint {self.manifest.model_fingerprint[:12]}, "
                f"but {model_dir} has {fp[:12]}"
            )


def _load_artifact(folder: str) -> Loaded:
    ref = AlignmentReference.load(folder)
    return Loaded(ref, ref.manifest.content_hash)


#: The alignment reference artifact: every repair method and the risk score read it.
REFERENCE = ArtifactKind(
    name="reference",
    path_field="reference_path",
    load=_load_artifact,
    what="alignment reference",
    how="`vllm-safeguard reference build` (AlignmentReference.save)",
)
