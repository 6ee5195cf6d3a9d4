"""Reading a Hugging Face model folder (safetensors shards): identity, shapes, norms, weights.

The one reader of model folders: the alignment reference, SafeGene extraction, admission's update
bound and the merged evaluator all read the served model through these functions. Shapes and the
fingerprint come from headers only; weights are read one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdapterValidationError, ReferenceArtifactError


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """Identity of a HF model folder: sha256 over its config and every weight's name/shape/dtype.

    Reads headers only. Two folders with the same architecture but different weights share a
    fingerprint; that is enough to catch "reference built for another base model" (shapes differ).
    """
    root = Path(model_dir)
    h = hashlib.sha256()
    cfg = root / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        keep = {
            k: data.get(k)
            for k in (
                "model_type",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        }
        h.update(json.dumps(keep, sort_keys=True).encode())
    for fp in sorted(root.glob("*.safetensors")):
        with safe_open(str(fp), framework="pt", device="cpu") as f:
            for name in sorted(f.keys()):
                sl = f.get_slice(name)
                h.update(f"{name}:{sl.get_shape()}:{sl.get_dtype()}".encode())
    return h.hexdigest()


def module_shapes_from_model_dir(model_dir: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """``module path -> (out, in)`` for every 2-D ``*.weight`` in a HF safetensors model folder.

    Reads only headers (``get_slice(...).get_shape()``), never the weights.
    """
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise AdapterValidationError("no *.safetensors weights in model folder", file=str(root))
    shapes: dict[str, tuple[int, int]] = {}
    for fp in files:
        with safe_open(str(fp), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if not name.endswith(".weight"):
                    continue
                shape = f.get_slice(name).get_shape()
                if len(shape) == 2:
                    shapes[name[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return shapes


def module_norms_from_model_dir(
    model_dir: str | os.PathLike[str], keep: Callable[[str], bool] | None = None
) -> dict[str, float]:
    """``module path -> ||W||_F`` (fp32) of the base model's 2-D ``*.weight`` tensors (all, or those
    whose module path ``keep`` accepts). Read once per process; it bounds an adapter's update against
    the weight it changes.
    """
    root = Path(model_dir)
    norms: dict[str, float] = {}
    for fp in sorted(root.glob("*.safetensors")):
        with safe_open(str(fp), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module is None or (keep is not None and not keep(module)):
                    continue
                if len(f.get_slice(name).get_shape()) == 2:
                    norms[module] = float(torch.linalg.norm(f.get_tensor(name).to(torch.float32)))
    return norms


def weight_index(model_dir: Path) -> dict[str, Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ReferenceArtifactError(f"{model_dir}: no *.safetensors weights")
    index: dict[str, Path] = {}
    for fp in files:
        with safe_open(str(fp), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                index[name] = fp
    return index


def read_weights(model_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every weight of a safetensors checkpoint folder (all shards), as fp32."""
    return {name: read_tensor(fp, name) for name, fp in weight_index(Path(model_dir)).items()}


def read_tensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_tensor(name).float()
