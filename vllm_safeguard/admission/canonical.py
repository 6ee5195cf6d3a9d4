"""The canonical form: the one adapter representation that is scored, repaired, written and served.

vLLM never reads the caller's folder (see :mod:`vllm_safeguard.admission.pipeline`); it reads a folder that
:func:`write_canonical` wrote, whose meaning leaves vLLM nothing to interpret.

Semantics (per module, from the validated PEFT reading in :mod:`vllm_safeguard.core.adapter_io`, which
follows vLLM's ``PEFTHelper`` rules for ``alpha / r``, rsLoRA and ``rank_pattern`` / ``alpha_pattern``)::

    A_c = fp32(A)                               # [r, in]
    B_c = fp32(B) * scaling                     # [out, r]: the scaling folded in, in fp32
    keep rank component i iff A_c[i, :] != 0 and B_c[:, i] != 0    # dead components add nothing
    B_c, A_c = svd_factors(B_c A_c) if the components cancel   # lowrank.refactorize, see _cancels
    with the served dtype d: A_c, B_c = fp32(d(A_c)), fp32(d(B_c))   # vLLM's cast is then exact
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
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.adapter import LoRAAdapter, LoRAModule, module_kind
from ..core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, peft_key, write_folder_atomically
from ..core.lowrank import frob2, refactorize
from ..errors import AdapterValidationError

# Fields of the canonical adapter_config.json (nothing else is written).
CANONICAL_FORMAT = "vllm-safeguard-canonical/1"


def canonical_module(mod: LoRAModule, served_dtype: torch.dtype | None = None) -> LoRAModule | None:
    """``mod`` in canonical form (see the module docstring); None if its update is zero.

    When its rank components cancel (or its factors do not fit the served dtype) the update is
    re-factored into its SVD factors (:func:`~vllm_safeguard.core.lowrank.refactorize`), so no pair of
    components that cancels in fp32 survives to be un-cancelled by the server's rounding; then, with
    ``served_dtype``, both factors are rounded to it (and kept as fp32 values), so vLLM's cast to its
    LoRA dtype is exact and the factors scored are the factors applied.
    """
    if _is_canonical(mod, served_dtype):
        return mod  # e.g. a module a method kept: the same object, so admission can reuse its score
    a = mod.lora_a if mod.lora_a.dtype == torch.float32 else mod.lora_a.to(torch.float32)
    b = mod.lora_b if mod.lora_b.dtype == torch.float32 else mod.lora_b.to(torch.float32)
    if mod.scaling != 1.0:
        b = b * mod.scaling
    a_max, b_max = _amax(a), _amax(b)
    if not (math.isfinite(a_max) and math.isfinite(b_max)):  # before any arithmetic on them
        raise AdapterValidationError(
            "scaled factor (lora_alpha / r) * B is not finite in fp32", key=mod.name, value=mod.scaling
        )
    kept = _live(a, b)
    if kept is None:
        return None
    a, b = kept
    unbalanced = served_dtype is not None and max(a_max, b_max) > 0.5 * torch.finfo(served_dtype).max
    if unbalanced or _cancels(b, a):  # SVD factors are balanced (sqrt(S) on each side) too
        # rtol 1e-5: drops the fp32 noise (~1e-7-1e-6 of the top singular value) that exactly
        # cancelling components leave in the SVD; what is dropped changes the update by < 1e-5 of it.
        b, a, _ = refactorize(b, a, rtol=1e-5)
    if served_dtype is not None and served_dtype != torch.float32:
        kept = _live(a.to(served_dtype).to(torch.float32), b.to(served_dtype).to(torch.float32))
        if kept is None:  # rounding flushed every component to zero
            return None
        a, b = kept
    return LoRAModule(mod.name, a.contiguous(), b.contiguous(), 1.0)


def _energies(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||a_i||^2, ||b_i||^2)`` per rank component (a sum of squares: ~8x faster than ``any(dim=0)``
    over a ``[11008, r]`` factor; an entry below ~1e-19 squares to 0 and its component counts as dead,
    which drops it from what is scored and served alike)."""
    return (a * a).sum(1), (b * b).sum(0)


def _live(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The factors without dead rank components (a zero row of A or column of B); None if none is left."""
    na, nb = _energies(a, b)
    live = (na > 0) & (nb > 0)
    if not bool(live.any()):
        return None
    return (a, b) if bool(live.all()) else (a[live], b[:, live])


# Re-factor when ||B A||_F^2 is below this share of sum_i ||b_i||^2 ||a_i||^2 (the energy the rank
# components would have if they did not interfere). Above it, components that cancel carry at most
# (1 - x) / x of the update's energy, so the part rounding could un-cancel stays under ~2^-8 of the
# update in bf16; below it (cancelling pairs), the SVD removes them. Always re-factoring cost 3x on a
# 7B-shaped cold admission (bench_admission: NLSR 9.1 s vs 2.9 s before).
_CANCEL_SHARE = 0.5


def _cancels(
    b: torch.Tensor, a: torch.Tensor, energies: tuple[torch.Tensor, torch.Tensor] | None = None
) -> bool:
    """Whether the rank components interfere (``||B A||^2`` under ``_CANCEL_SHARE`` of their independent
    energy); a NaN counts as cancelling, so it is never taken for canonical."""
    na, nb = _energies(a, b) if energies is None else energies
    return not float(frob2(b, a)) >= _CANCEL_SHARE * float((na * nb).sum())


def _is_canonical(mod: LoRAModule, served_dtype: torch.dtype | None) -> bool:
    """Already in canonical form: fp32, scaling 1, every component live, nothing to re-factor, and
    (with a served dtype) values that dtype holds exactly."""
    a, b = mod.lora_a, mod.lora_b
    if mod.scaling != 1.0 or a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    na, nb = _energies(a, b)
    if not (bool((na > 0).all()) and bool((nb > 0).all())):
        return False
    a_max, b_max = _amax(a), _amax(b)
    if not (math.isfinite(a_max) and math.isfinite(b_max)):
        return False
    if served_dtype is not None and served_dtype != torch.float32:
        if max(a_max, b_max) > 0.5 * torch.finfo(served_dtype).max:
            return False
        if not (torch.equal(a.to(served_dtype).float(), a) and torch.equal(b.to(served_dtype).float(), b)):
            return False
    return not _cancels(b, a, (na, nb))


def _amax(t: torch.Tensor) -> float:
    """``max |t|`` (NaN if any entry is NaN: torch's max propagates it)."""
    return float(t.abs().amax())


def canonicalize(adapter: LoRAAdapter, served_dtype: torch.dtype | None = None) -> LoRAAdapter:
    """The canonical in-memory adapter (see the module docstring).

    Raises:
        AdapterValidationError: the folded factors are not finite, or every module is a zero update.
    """
    modules: dict[str, LoRAModule] = {}
    for name, mod in sorted(adapter.modules.items()):
        c = canonical_module(mod, served_dtype)
        if c is not None:
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
        if m.scaling != 1.0 or m.lora_a.dtype != torch.float32 or m.lora_b.dtype != torch.float32:
            raise ValueError(f"{name}: not canonical (scaling {m.scaling!r}); call canonicalize first")
        if m.rank == rank:  # nothing to pad: the factors themselves (safetensors copies on write)
            a, b = m.lora_a.contiguous(), m.lora_b.contiguous()
        else:
            a = torch.zeros(rank, m.in_features, dtype=torch.float32)
            b = torch.zeros(m.out_features, rank, dtype=torch.float32)
            a[: m.rank] = m.lora_a
            b[:, : m.rank] = m.lora_b
        out[peft_key(name, "A")] = a
        out[peft_key(name, "B")] = b
    return out


def write_canonical(adapter: LoRAAdapter, folder: str | os.PathLike[str]) -> Path:
    """Write the canonical folder atomically (temp folder + rename). ``adapter`` must be canonical."""
    tensors = canonical_tensors(adapter)

    def write(tmp: Path) -> None:
        # One metadata key: safetensors writes a multi-key metadata map in a random order (its bytes, and
        # so the cache entry's hash, would differ between two builds of the same adapter).
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(
            json.dumps(canonical_config(adapter.modules), indent=2, sort_keys=True)
        )

    return write_folder_atomically(folder, write)


def same_update(a: LoRAAdapter, b: LoRAAdapter, rtol: float = 1e-5) -> bool:
    """Whether two adapters serve the same update: same modules, and per module
    ``||B_a A_a - B_b A_b||_F <= rtol * ||B_a A_a||_F`` (through the factors).

    Not bitwise: the canonical SVD factors of an unchanged update are re-computed after a method ran,
    which moves them by fp32 rounding (~1e-7 relative) without changing what is served. A module that
    is the same object is the same update; a clearly different one is told apart in fp32 (first
    difference returns); only a near-equal one is confirmed in float64 (the fp32 Gram form cannot
    resolve 1e-10 of the energy). This keeps the check ~free on a repaired 7B-shaped adapter.
    """
    if set(a.modules) != set(b.modules):
        return False
    for name, ma in a.modules.items():
        mb = b.modules[name]
        if ma is mb:
            continue
        if ma.in_features != mb.in_features or ma.out_features != mb.out_features:
            return False
        for dtype, tol in ((torch.float32, 1e-3), (torch.float64, rtol)):
            ba, aa = ma.scaled_b().to(dtype), ma.lora_a.to(dtype)
            bb, ab = mb.scaled_b().to(dtype), mb.lora_a.to(dtype)
            ref = float(frob2(ba, aa))
            diff = float(frob2(torch.cat([ba, -bb], 1), torch.cat([aa, ab], 0)))
            if not max(diff, 0.0) <= (tol**2) * max(ref, 0.0):
                return False
    return True


def update_norm(mod: LoRAModule) -> float:
    """``||B A||_F`` of a canonical module (inf when the Gram terms overflow fp32). The Gram form can
    round slightly below zero for a near-zero update; that is clamped (NaN stays NaN)."""
    value = float(frob2(mod.lora_b, mod.lora_a))
    return max(value, 0.0) ** 0.5 if not math.isnan(value) else value


def check_served_dtype(adapter: LoRAAdapter, dtype: torch.dtype) -> None:
    """Refuse factors that are not finite once cast to ``dtype`` (what the server computes in).

    A cast overflows exactly when ``max |x|`` exceeds the dtype's largest finite value (checked as one
    reduction, without materializing the cast). Besides, ``r * max|A| * max|B|`` (a bound on every
    entry of ``B A``) must fit ``dtype``.
    """
    limit = torch.finfo(dtype).max
    for name, m in adapter.modules.items():
        a_max, b_max = _amax(m.lora_a), _amax(m.lora_b)
        for side, v in (("A", a_max), ("B", b_max)):
            if not v <= limit:
                raise AdapterValidationError(
                    f"factor lora_{side} overflows the served dtype {dtype}",
                    key=name,
                    value=v,
                    has_value=True,
                )
        bound = m.rank * a_max * b_max
        if not bound <= limit:
            raise AdapterValidationError(
                f"update B @ A can overflow the served dtype {dtype}", key=name, value=bound, has_value=True
            )


def module_kinds(adapter: LoRAAdapter) -> list[str]:
    return sorted({module_kind(n) for n in adapter.modules})


def write_zero_adapter(
    shapes: Mapping[str, tuple[int, int]], candidates: set[str], folder: str | os.PathLike[str]
) -> Path:
    """A canonical rank-1 adapter of one module (the first of ``candidates`` in ``shapes``) whose update
    is exactly zero: what the worker hands vLLM for an adapter it cannot serve inside an engine step,
    so that its requests get the base model. vLLM cannot add an adapter without modules: its
    ``_create_merged_loras_inplace`` reads the first module (StopIteration kills the engine core).
    Written once (an existing folder is reused)."""
    out = Path(folder)
    if (out / WEIGHTS_NAME).is_file():
        return out
    names = sorted(n for n in candidates if n in shapes)
    if not names:
        raise ValueError("no module of the model can carry the zero adapter")
    name = names[0]
    rows, cols = shapes[name]
    module = LoRAModule(name, torch.zeros(1, cols), torch.zeros(rows, 1), 1.0)
    return write_canonical(LoRAAdapter(config={}, modules={name: module}), out)
