"""The canonical form: the one adapter representation that is scored, repaired, written and served.

vLLM never reads the caller's folder (see :mod:`vllm_safeguard.pipeline`); it reads a folder that
:func:`write_canonical` wrote, whose meaning leaves vLLM nothing to interpret.

Semantics (per module, from the validated PEFT reading in :mod:`vllm_safeguard.adapter_io`, which
follows vLLM's ``PEFTHelper`` rules for ``alpha / r``, rsLoRA and ``rank_pattern`` / ``alpha_pattern``)::

    A_c = fp32(A)                               # [r, in]
    B_c = fp32(B) * scaling                     # [out, r]: the scaling folded in, in fp32
    keep rank component i iff A_c[i, :] != 0 and B_c[:, i] != 0    # dead components add nothing
    drop the module iff no component is kept                       # a zero update
    on disk: every module zero-padded to R = max rank, fp32, config {r: R, lora_alpha: R,
    use_rslora: false, no patterns, target_modules: explicit list}  # vLLM's scaling R / R == 1

So ``vLLM's loader(folder) == canonical_tensors(adapter)`` bitwise in fp32 (zero padding and a
scaling of exactly 1 change nothing); ``tests/plugin/test_canonical_vllm.py`` checks it with vLLM's
own ``LoRAModel.from_local_checkpoint`` over random adapters and configs.

Dropping dead components matters for the maths too: a rank column with a zero row in ``A`` and
``1e20`` in ``B`` serves nothing, but its Gram terms overflow (``inf * 0 = NaN``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .adapter import LoRAAdapter, LoRAModule, module_kind
from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, peft_key
from .errors import AdapterValidationError
from .lowrank import frob2

# Fields of the canonical adapter_config.json (nothing else is written).
CANONICAL_FORMAT = "vllm-safeguard-canonical/1"


def canonical_module(mod: LoRAModule) -> LoRAModule | None:
    """``mod`` with its scaling folded into ``B`` (fp32) and dead rank components dropped; None if zero."""
    a = mod.lora_a.to(torch.float32)
    b = mod.lora_b.to(torch.float32) * mod.scaling if mod.scaling != 1.0 else mod.lora_b.to(torch.float32)
    live = (a != 0).any(dim=1) & (b != 0).any(dim=0)
    if not bool(live.any()):
        return None
    if not bool(live.all()):
        a, b = a[live], b[:, live]
    return LoRAModule(mod.name, a.contiguous(), b.contiguous(), 1.0)


def canonicalize(adapter: LoRAAdapter) -> LoRAAdapter:
    """The canonical in-memory adapter (see the module docstring).

    Raises:
        AdapterValidationError: the folded factors are not finite, or every module is a zero update.
    """
    modules: dict[str, LoRAModule] = {}
    for name, mod in sorted(adapter.modules.items()):
        c = canonical_module(mod)
        if c is None:
            continue
        if not (torch.isfinite(c.lora_a).all() and torch.isfinite(c.lora_b).all()):
            raise AdapterValidationError(
                "scaled factor (lora_alpha / r) * B is not finite in fp32", key=name, value=mod.scaling
            )
        modules[name] = c
    if not modules:
        raise AdapterValidationError("the adapter's update is zero in every module (nothing to serve)")
    return LoRAAdapter(
        config=canonical_config(modules),
        modules=modules,
        dtype=adapter.dtype,
        source=adapter.source,
        metadata=dict(adapter.metadata),
    )


def canonical_rank(modules: Mapping[str, LoRAModule]) -> int:
    return max(m.rank for m in modules.values())


def canonical_config(modules: Mapping[str, LoRAModule]) -> dict[str, Any]:
    """The plain config vLLM is handed: one rank, scaling 1, an explicit module list, nothing else."""
    rank = canonical_rank(modules)
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": sorted(modules),
        "modules_to_save": None,
        "safeguard_format": CANONICAL_FORMAT,
    }


def canonical_tensors(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    """Exactly the tensors written (and read back by vLLM): PEFT keys, fp32, zero-padded to one rank."""
    rank = canonical_rank(adapter.modules)
    out: dict[str, torch.Tensor] = {}
    for name, m in sorted(adapter.modules.items()):
        if m.scaling != 1.0:
            raise ValueError(f"{name}: not canonical (scaling {m.scaling!r}); call canonicalize first")
        a = torch.zeros(rank, m.in_features, dtype=torch.float32)
        b = torch.zeros(m.out_features, rank, dtype=torch.float32)
        a[: m.rank] = m.lora_a
        b[:, : m.rank] = m.lora_b
        out[peft_key(name, "A")] = a
        out[peft_key(name, "B")] = b
    return out


def write_canonical(adapter: LoRAAdapter, folder: str | os.PathLike[str]) -> Path:
    """Write the canonical folder atomically (temp folder + rename). ``adapter`` must be canonical."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = canonical_tensors(adapter)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # One metadata key: safetensors writes a multi-key metadata map in a random order (its bytes, and
        # so the cache entry's hash, would differ between two builds of the same adapter).
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(
            json.dumps(canonical_config(adapter.modules), indent=2, sort_keys=True)
        )
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def same_update(a: LoRAAdapter, b: LoRAAdapter) -> bool:
    """Whether two canonical adapters serve the same update (same modules, same factors, bitwise)."""
    if set(a.modules) != set(b.modules):
        return False
    for name, ma in a.modules.items():
        mb = b.modules[name]
        if ma.lora_a.shape != mb.lora_a.shape or ma.lora_b.shape != mb.lora_b.shape:
            return False
        if not (torch.equal(ma.lora_a, mb.lora_a) and torch.equal(ma.lora_b, mb.lora_b)):
            return False
    return True


def update_norm(mod: LoRAModule) -> float:
    """``||B A||_F`` of a canonical module (inf when the Gram terms overflow fp32)."""
    value = float(frob2(mod.lora_b, mod.lora_a))
    return value**0.5 if value >= 0 else float("nan")


def check_served_dtype(adapter: LoRAAdapter, dtype: torch.dtype) -> None:
    """Refuse factors that are not finite once cast to ``dtype`` (what the server computes in).

    Besides the cast, ``r * max|A| * max|B|`` (a bound on every entry of ``B A``) must fit ``dtype``.
    """
    limit = torch.finfo(dtype).max
    for name, m in adapter.modules.items():
        for side, t in (("A", m.lora_a), ("B", m.lora_b)):
            if not torch.isfinite(t.to(dtype)).all():
                raise AdapterValidationError(
                    f"factor lora_{side} overflows the served dtype {dtype}",
                    key=name,
                    value=float(t.abs().max()),
                )
        bound = m.rank * float(m.lora_a.abs().max()) * float(m.lora_b.abs().max())
        if not bound <= limit:
            raise AdapterValidationError(
                f"update B @ A can overflow the served dtype {dtype}", key=name, value=bound, has_value=True
            )


def module_kinds(adapter: LoRAAdapter) -> list[str]:
    return sorted({module_kind(n) for n in adapter.modules})
