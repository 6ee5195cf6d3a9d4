"""Metadata and host helpers shared by the fused safety-LoRA shrink and expand kernels.

* :class:`SafetyLoRAKernelMeta`: vLLM's sorted-by-adapter token layout plus the per-token alpha
  buffer. This package must not import vLLM (the GPU benchmark machine has torch + triton only), so it
  mirrors ``vllm.lora.ops.triton_ops.LoRAKernelMeta``; :class:`SafetyLoRAMetaArgs` names the
  metadata arguments of the wrappers, in order.
* the per-slice pointer table handed to both kernels, and the dtype / precision / tile-size helpers
  of the launchers in ``fused_safety_lora_shrink.py`` and ``fused_safety_lora_expand.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

__all__ = ["SafetyLoRAKernelMeta", "SafetyLoRAMetaArgs", "make_safety_lora_meta"]

# Columns of the per-slice int64 table handed to the kernels (one row per slice). Slices are separate
# tensors in vLLM (q/k/v, gate/up), so, like vLLM's `_get_lora_{a,b}_ptr`, we pass raw data pointers.
_T_TASK_A = 0  # data_ptr of lora_a_stacked[slice]   [max_loras, r, in]
_T_SAFE_A = 1  # data_ptr of safety_a[slice]         [r_s, in]
_T_TASK_B = 2  # data_ptr of lora_b_stacked[slice]   [max_loras, out_slice, r]
_T_SAFE_B = 3  # data_ptr of safety_b[slice]         [out_slice, r_s]
_T_OUT_N = 4  # out_slice (differs per slice for GQA qkv)
_T_OUT_OFF = 5  # first output column of this slice in y
_T_TASK_B_S0 = 6  # lora_b_stacked[slice].stride(0) (= out_slice * r, so per slice)
_T_WIDTH = 8

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 for fp32 inputs, as tl.dot (and so vLLM's own LoRA kernels) do by default on NVIDIA:
    # an fp32 model's LoRA gets the same rounding with and without the plugin. 16-bit inputs ignore it.
    return "tf32"


def _num_stages(stages: int, capability: tuple[int, int] | None, casts_to_16bit: bool) -> int:
    """vLLM 0.33's rule (``lora_expand_op.py``): "Pipelined wgmma with a register A operand is
    miscompiled by ptxas < 13.3 on SM90 (triton-lang/triton#9433)", so 1 stage on SM90 when the fp32
    shrink buffer is cast to 16-bit weights for the dot."""
    return 1 if capability == (9, 0) and casts_to_16bit else stages


def _capability(t: torch.Tensor) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(t.device)) if t.is_cuda else None  # type: ignore[return-value]


def _upcast(dtype: torch.dtype, interpreter: bool) -> bool:
    return interpreter and dtype == torch.bfloat16


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


# --------------------------------------------------------------------------------------------------
# Metadata (mirrors vllm.lora.ops.triton_ops.LoRAKernelMeta, without importing vLLM)
# --------------------------------------------------------------------------------------------------


class SafetyLoRAMetaArgs(NamedTuple):
    """The metadata arguments of ``fused_safety_shrink`` / ``fused_safety_expand`` /
    ``fused_safety_lora``, in order (what :meth:`SafetyLoRAKernelMeta.meta_args` returns)."""

    token_lora_mapping: torch.Tensor  # [num_tokens] int32, -1 = no task adapter
    token_indices_sorted_by_lora_ids: torch.Tensor  # [num_tokens]
    num_tokens_per_lora: torch.Tensor  # [max_loras + 1]
    lora_token_start_loc: torch.Tensor  # [max_loras + 2]
    lora_ids: torch.Tensor  # [max_loras + 1]
    skip_flag_cpu: torch.Tensor  # [1] bool CPU: no adapter and alpha == 0 everywhere
    num_active_groups: torch.Tensor | int  # CPU [1] or int: groups to launch (<= max_loras + 1)


@dataclass
class SafetyLoRAKernelMeta:
    """Sorted-by-adapter token metadata plus the per-token alpha buffer, preallocated once.

    Same tensors and order as vLLM's ``LoRAKernelMeta.meta_args`` except:

    * ``skip_flag_cpu`` replaces ``no_lora_flag_cpu``: True only when no token has a task adapter
      AND every alpha is 0 (vLLM's flag is "all tokens are -1", which would wrongly skip the safety
      delta of no-adapter tokens). Unlike vLLM's ``prepare_tensors`` the sorted indices are filled
      even when every token is -1, for the same reason.
    * ``token_alpha`` is owned here so that, under CUDA graphs, new alphas are copied into the
      same storage in place.
    """

    max_loras: int
    token_lora_mapping: torch.Tensor  # [max_num_tokens] int32
    token_indices_sorted_by_lora_ids: torch.Tensor  # [max_num_tokens] int32
    active_lora_ids: torch.Tensor  # [max_loras + 1] int32, -1 padded (-1 also = "no adapter" group)
    num_tokens_per_lora: torch.Tensor  # [max_loras + 1] int32
    lora_token_start_loc: torch.Tensor  # [max_loras + 2] int32
    token_alpha: torch.Tensor  # [max_num_tokens] fp32
    skip_flag_cpu: torch.Tensor  # [1] bool, CPU
    num_active_groups_cpu: torch.Tensor  # [1] int32, CPU: distinct ids incl. -1
    default_num_groups_cpu: torch.Tensor  # [1] int32, CPU: max_loras + 1 (stable grid for graphs)

    @staticmethod
    def make(max_loras: int, max_num_tokens: int, device: torch.device | str) -> SafetyLoRAKernelMeta:
        i32 = torch.int32
        return SafetyLoRAKernelMeta(
            max_loras=max_loras,
            token_lora_mapping=torch.full((max_num_tokens,), -1, dtype=i32, device=device),
            token_indices_sorted_by_lora_ids=torch.zeros(max_num_tokens, dtype=i32, device=device),
            active_lora_ids=torch.full((max_loras + 1,), -1, dtype=i32, device=device),
            num_tokens_per_lora=torch.zeros(max_loras + 1, dtype=i32, device=device),
            lora_token_start_loc=torch.zeros(max_loras + 2, dtype=i32, device=device),
            token_alpha=torch.zeros(max_num_tokens, dtype=torch.float32, device=device),
            skip_flag_cpu=torch.tensor([True], dtype=torch.bool),
            num_active_groups_cpu=torch.tensor([0], dtype=torch.int32),
            default_num_groups_cpu=torch.tensor([max_loras + 1], dtype=torch.int32),
        )

    def prepare_tensors(self, token_lora_mapping: torch.Tensor, token_alpha: torch.Tensor) -> None:
        """Fill the metadata for one forward pass (in place).

        Args:
            token_lora_mapping: ``[num_tokens]`` adapter slot per token, -1 = no task adapter.
            token_alpha: ``[num_tokens]`` safety strength per token. Pass CPU tensors (the host
                already has both from the scheduler) to avoid device->host syncs here.
        """
        n = token_lora_mapping.numel()
        if token_alpha.numel() != n:
            raise ValueError(f"token_alpha has {token_alpha.numel()} entries for {n} tokens")
        if n > self.token_lora_mapping.numel():
            raise ValueError(f"{n} tokens exceed max_num_tokens={self.token_lora_mapping.numel()}")
        mapping = token_lora_mapping.to(torch.int32)
        alpha = token_alpha.to(torch.float32)
        if n and (int(mapping.max()) >= self.max_loras or int(mapping.min()) < -1):
            raise ValueError(f"token_lora_mapping values must lie in [-1, {self.max_loras}), got {mapping}")
        self.active_lora_ids.fill_(-1)
        self.num_tokens_per_lora.fill_(0)
        self.lora_token_start_loc.fill_(0)
        self.token_lora_mapping[:n].copy_(mapping, non_blocking=True)
        self.token_alpha[:n].copy_(alpha, non_blocking=True)
        skip = bool(n == 0 or (bool(torch.all(mapping == -1)) and bool(torch.all(alpha == 0))))
        self.skip_flag_cpu[0] = skip
        if n == 0:
            self.num_active_groups_cpu[0] = 0
            return
        _, order = torch.sort(mapping, stable=True)
        self.token_indices_sorted_by_lora_ids[:n].copy_(order.to(torch.int32), non_blocking=True)
        ids, counts = torch.unique(mapping, sorted=True, return_counts=True)
        g = ids.numel()
        self.active_lora_ids[:g].copy_(ids.to(torch.int32), non_blocking=True)
        self.num_tokens_per_lora[:g].copy_(counts.to(torch.int32), non_blocking=True)
        self.lora_token_start_loc[1 : 1 + g].copy_(torch.cumsum(counts, 0).to(torch.int32), non_blocking=True)
        self.num_active_groups_cpu[0] = g

    def meta_args(self, num_tokens: int, specialize_active_groups: bool = True) -> SafetyLoRAMetaArgs:
        """The metadata arguments of the wrappers, in order (see :class:`SafetyLoRAMetaArgs`).
        ``specialize_active_groups=False`` launches ``max_loras + 1`` groups (extra ones exit at
        once): a stable grid for CUDA graph capture."""
        groups = self.num_active_groups_cpu if specialize_active_groups else self.default_num_groups_cpu
        return SafetyLoRAMetaArgs(
            self.token_lora_mapping[:num_tokens],
            self.token_indices_sorted_by_lora_ids[:num_tokens],
            self.num_tokens_per_lora,
            self.lora_token_start_loc,
            self.active_lora_ids,
            self.skip_flag_cpu,
            groups,
        )


def make_safety_lora_meta(
    token_lora_mapping: torch.Tensor, token_alpha: torch.Tensor, max_loras: int, device: torch.device | str
) -> SafetyLoRAKernelMeta:
    """One-shot helper: allocate a :class:`SafetyLoRAKernelMeta` for these tokens and prepare it."""
    meta = SafetyLoRAKernelMeta.make(max_loras, max(1, token_lora_mapping.numel()), device)
    meta.prepare_tensors(token_lora_mapping.cpu(), token_alpha.cpu())
    return meta


# --------------------------------------------------------------------------------------------------
# Slice tables (cached: under CUDA graphs they must be built before capture, like vLLM's ptr LUTs)
# --------------------------------------------------------------------------------------------------

_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def _as_3d(w: torch.Tensor, name: str) -> torch.Tensor:
    if w.ndim == 4:  # vLLM's [max_loras, 1, r, in] / [max_loras, 1, out, r]
        assert w.size(1) == 1, f"{name}: expected dim 1 of size 1, got {tuple(w.shape)}"
        w = w.squeeze(1)
    assert w.ndim == 3, f"{name}: expected [max_loras, *, *], got {tuple(w.shape)}"
    return w


def _key(ts: Sequence[torch.Tensor] | None) -> tuple:
    return () if ts is None else tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in ts)


def _table(
    device: torch.device,
    num_slices: int,
    task_a: Sequence[torch.Tensor] | None = None,
    safe_a: Sequence[torch.Tensor] | None = None,
    task_b: Sequence[torch.Tensor] | None = None,
    safe_b: Sequence[torch.Tensor] | None = None,
    out_sizes: Sequence[int] = (),
    offset_start: int = 0,
) -> torch.Tensor:
    key = (
        str(device),
        num_slices,
        _key(task_a),
        _key(safe_a),
        _key(task_b),
        _key(safe_b),
        tuple(out_sizes),
        offset_start,
    )
    cached = _TABLE_CACHE.get(key)
    if cached is not None:
        return cached
    rows = []
    off = offset_start
    for s in range(num_slices):
        n = out_sizes[s] if out_sizes else 0
        rows.append(
            [
                task_a[s].data_ptr() if task_a is not None else 0,
                safe_a[s].data_ptr() if safe_a is not None else 0,
                task_b[s].data_ptr() if task_b is not None else 0,
                safe_b[s].data_ptr() if safe_b is not None else 0,
                n,
                off,
                task_b[s].stride(0) if task_b is not None else 0,
                0,
            ]
        )
        off += n
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    _TABLE_CACHE[key] = table
    return table
