"""Fused expand of task LoRA + safety delta (punica layout): one read-modify-write of ``y``.

Semantics (per slice ``s``, token ``t`` with task adapter ``i``, ``r`` task and ``r_s`` safety ranks)::

    y[t, slice s] (+)= buffer[s, t, :r] B_i[s]^T  +  buffer[s, t, r:r+r_s] B_s[s]^T

i.e. ``buffer[s, t] @ [B_i ; B_s]^T`` over the rank-concatenated B, where the safety term is only
added where ``alpha[t] != 0`` and rows with neither a task adapter nor a non-zero alpha are not
written (see the design notes in ``fused_safety_lora.py``; torch reference:
``kernels/torch_ops/fused_safety_lora.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .fused_safety_lora_meta import (
    _DTYPES,
    _T_WIDTH,
    _as_3d,
    _capability,
    _dot_precision,
    _interpreting,
    _num_stages,
    _pow2_clamp,
    _table,
    _upcast,
)

__all__ = ["ExpandConfig", "expand_launch", "fused_safety_expand"]


@dataclass(frozen=True)
class ExpandConfig:
    """Expand launch parameters; the task and safety ranks are tiled separately."""

    block_m: int = 16
    block_n: int = 64
    block_k_task: int = 16
    block_k_safety: int = 16
    num_warps: int = 4
    num_stages: int = 2


def _default_expand_config(
    m: int, max_n: int, r_t: int, r_s: int, interpreter: bool | None = None
) -> ExpandConfig:
    """Defaults. The rank tiles depend on ``r`` and ``r_s`` alone (the task sum is computed the same
    way with or without a safety delta) and stay <= 32, like vLLM's expand (block_k 32).

    Why these tiles (sm_90, bf16, ranks 16-64, AOT-compiled: tests/kernels/test_fused_safety_lora_aot.py):
    64 x 128 with 4 warps reached 255 registers and 320-728 bytes of spills even with one
    accumulator; 8 warps at 64 x 128 fit (~233 registers, no spills), and 32 x 128 at 4 warps with a
    64-wide rank tile spilled 160 bytes, hence the 32-wide rank tiles.
    """
    kt, ks = _pow2_clamp(r_t, 16, 32), _pow2_clamp(r_s, 16, 32)
    if _interpreting() if interpreter is None else interpreter:
        return ExpandConfig(
            block_m=_pow2_clamp(m, 16, 32),
            block_n=_pow2_clamp(max_n, 16, 128),
            block_k_task=kt,
            block_k_safety=ks,
        )
    if m <= 16:
        return ExpandConfig(block_m=16, block_n=128, block_k_task=kt, block_k_safety=ks, num_warps=4)
    if m <= 256:
        return ExpandConfig(block_m=32, block_n=128, block_k_task=kt, block_k_safety=ks, num_warps=4)
    return ExpandConfig(block_m=64, block_n=128, block_k_task=kt, block_k_safety=ks, num_warps=8)


def expand_launch(
    cfg: ExpandConfig,
    *,
    dtype: torch.dtype,
    max_n: int,
    has_task: bool,
    has_safety: bool,
    add_inputs: bool,
    capability: tuple[int, int] | None,
    interpreter: bool = False,
) -> tuple[dict[str, Any], int, int]:
    """``(constexprs, num_warps, num_stages)`` of one expand launch: the launcher and the AOT compile
    (``aot.py``) build the same kernel variant from it. The fp32 buffer is cast to the weight dtype
    before the dot, hence 1 stage on SM90 for 16-bit weights (:func:`_num_stages`)."""
    constexprs = {
        "MAX_N": max_n,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_KT": cfg.block_k_task,
        "BLOCK_KS": cfg.block_k_safety,
        "HAS_TASK": has_task,
        "HAS_SAFETY": has_safety,
        "ADD_INPUTS": add_inputs,
        "UPCAST": _upcast(dtype, interpreter),
        "DOT_PRECISION": _dot_precision(dtype),
        "TABLE_W": _T_WIDTH,
    }
    return constexprs, cfg.num_warps, _num_stages(cfg.num_stages, capability, dtype != torch.float32)


@triton.jit
def _fused_expand_kernel(
    buf_ptr,  # [S, M, R_T + R_S] fp32
    table_ptr,  # [S, _T_WIDTH] int64
    alpha_ptr,  # [M] fp32
    y_ptr,  # [M, >= offset_start + sum(out_slice)]
    M,
    R_T,
    R_S,
    sorted_token_ids_ptr,
    num_tokens_per_lora_ptr,
    lora_token_start_loc_ptr,
    lora_ids_ptr,
    buf_stride0,
    buf_stride1,
    buf_stride2,
    b_stride1,
    b_stride2,
    bs_stride0,
    bs_stride1,
    y_stride0,
    y_stride1,
    MAX_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KT: tl.constexpr,  # task-rank tile and safety-rank tile are chosen from r and r_s alone, so
    BLOCK_KS: tl.constexpr,  # the task sum is computed identically with or without a safety delta
    HAS_TASK: tl.constexpr,
    HAS_SAFETY: tl.constexpr,
    ADD_INPUTS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TABLE_W: tl.constexpr,
):
    num_n = tl.cdiv(MAX_N, BLOCK_N)
    pid = tl.program_id(axis=0)
    pid_n = pid % num_n
    pid_m = pid // num_n
    slice_id = tl.program_id(axis=1)
    group = tl.program_id(axis=2)

    row = table_ptr + slice_id * TABLE_W
    n_slice = tl.load(row + 4)
    if pid_n * BLOCK_N >= n_slice:
        # This slice is narrower than the widest one (k/v of GQA qkv).
        return
    lora_id = tl.load(lora_ids_ptr + group)
    m_size = tl.load(num_tokens_per_lora_ptr + group)
    m_off = pid_m * BLOCK_M
    if m_off >= m_size:
        return
    m_len = tl.minimum(BLOCK_M, m_size - m_off)
    m_start = tl.load(lora_token_start_loc_ptr + group)
    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < m_len
    ram = tl.load(sorted_token_ids_ptr + m_start + m_off + offs_m, mask=row_mask, other=0).to(tl.int64)

    if HAS_TASK:
        do_task = lora_id >= 0
    else:
        do_task = lora_id < -1
    if HAS_SAFETY:
        alpha = tl.load(alpha_ptr + ram, mask=row_mask, other=0.0)
        has_alpha = (alpha != 0.0) & row_mask
    else:
        has_alpha = offs_m < 0
    do_safe = tl.max(has_alpha.to(tl.int32), axis=0) > 0
    work = do_task | do_safe
    if not work:
        # No adapter and alpha 0 for every row of this block: y stays untouched (bit-identical).
        return

    w_ty = y_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_slice
    buf_rows = buf_ptr + slice_id * buf_stride0 + ram[:, None] * buf_stride1

    # ONE fp32 accumulator for both sums. The safety rows of the A tile are loaded as exact zeros
    # where alpha == 0 (masked load), so those rows add exact zeros after the task sum: alpha 0 stays
    # bit-identical to the run without a safety delta. (Two [BLOCK_M, BLOCK_N] fp32 accumulators took
    # the prefill config, 64 x 128 with 4 warps, to 255 registers and 536-728 bytes of spills on sm_90;
    # one accumulator: see tests/kernels/test_fused_safety_lora_aot.py.)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_TASK:  # noqa: SIM102 -- constexpr test outside, runtime test inside (no `and` mixing)
        if do_task:
            b_base = tl.load(row + 2).to(tl.pointer_type(w_ty))
            b_s0 = tl.load(row + 6)
            b_ptrs = b_base + lora_id.to(tl.int64) * b_s0 + offs_n[None, :] * b_stride1
            for k0 in range(0, tl.cdiv(R_T, BLOCK_KT)):
                k_idx = k0 * BLOCK_KT + tl.arange(0, BLOCK_KT)
                k_mask = k_idx < R_T
                a_tile = tl.load(
                    buf_rows + k_idx[None, :] * buf_stride2,
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                b_tile = tl.load(
                    b_ptrs + k_idx[:, None] * b_stride2, mask=k_mask[:, None] & n_mask[None, :], other=0.0
                )
                # Same rounding as vLLM's expand (CAST_TYPE): fp32 buffer -> weight dtype for the dot.
                a_tile = a_tile.to(w_ty)
                if UPCAST:
                    a_tile = a_tile.to(tl.float32)
                    b_tile = b_tile.to(tl.float32)
                acc += tl.dot(a_tile, b_tile, input_precision=DOT_PRECISION)
    if HAS_SAFETY:  # noqa: SIM102 -- constexpr test outside, runtime test inside (no `and` mixing)
        if do_safe:
            bs_base = tl.load(row + 3).to(tl.pointer_type(w_ty))
            bs_ptrs = bs_base + offs_n[None, :] * bs_stride0
            for k0 in range(0, tl.cdiv(R_S, BLOCK_KS)):
                k_idx = k0 * BLOCK_KS + tl.arange(0, BLOCK_KS)
                k_mask = k_idx < R_S
                a_tile = tl.load(
                    buf_rows + (R_T + k_idx)[None, :] * buf_stride2,
                    mask=has_alpha[:, None] & k_mask[None, :],
                    other=0.0,
                )
                b_tile = tl.load(
                    bs_ptrs + k_idx[:, None] * bs_stride1, mask=k_mask[:, None] & n_mask[None, :], other=0.0
                )
                a_tile = a_tile.to(w_ty)
                if UPCAST:
                    a_tile = a_tile.to(tl.float32)
                    b_tile = b_tile.to(tl.float32)
                acc += tl.dot(a_tile, b_tile, input_precision=DOT_PRECISION)

    # Rows with neither a task adapter nor a non-zero alpha are not written at all.
    # (tl.where, not `has_alpha | do_task`: the interpreter turns vector|scalar bools into int32.)
    write_row = tl.where(do_task, row_mask, has_alpha)
    out_off = tl.load(row + 5)
    c_ptrs = y_ptr + ram[:, None] * y_stride0 + (out_off + offs_n)[None, :] * y_stride1
    c_mask = write_row[:, None] & n_mask[None, :]
    if ADD_INPUTS:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(w_ty), mask=c_mask)


@torch.inference_mode()
def fused_safety_expand(
    inputs: torch.Tensor,  # [num_slices, num_tokens, r + r_s] fp32 (output of fused_safety_shrink)
    lora_b_stacked: Sequence[torch.Tensor]
    | None,  # num_slices x [max_loras, out_slice, r] (or [L, 1, out, r])
    safety_b: Sequence[torch.Tensor] | None,  # num_slices x [out_slice, r_s]
    token_alpha: torch.Tensor,  # [num_tokens] fp32
    output: torch.Tensor,  # [num_tokens, >= offset_start + sum(out_slice)]
    token_lora_mapping: torch.Tensor,  # [num_tokens]
    token_indices_sorted_by_lora_ids: torch.Tensor,  # [num_tokens]
    num_tokens_per_lora: torch.Tensor,  # [max_loras + 1]
    lora_token_start_loc: torch.Tensor,  # [max_loras + 2]
    lora_ids: torch.Tensor,  # [max_loras + 1]
    skip_flag_cpu: torch.Tensor,  # [1] bool CPU
    num_active_groups: torch.Tensor | int,  # CPU [1] or int
    offset_start: int = 0,
    add_inputs: bool = True,
    config: ExpandConfig | None = None,
) -> None:
    """Fused expand: ``output[t, slice cols] (+)= buffer[slice, t] @ [B_i ; B_s]^T`` for tokens with a
    task adapter or ``alpha != 0``; other rows are not touched. ``add_inputs=False`` overwrites
    instead of adding (vLLM's dual-stream mode)."""
    assert skip_flag_cpu.numel() == 1
    if inputs.size(1) == 0 or bool(skip_flag_cpu.item()):
        return
    assert lora_b_stacked is not None or safety_b is not None, "need task or safety weights"
    assert inputs.ndim == 3 and inputs.dtype == torch.float32 and inputs.is_contiguous(), (
        "inputs: fp32 [S, M, R]"
    )
    task_b = [_as_3d(w, "lora_b_stacked") for w in lora_b_stacked] if lora_b_stacked is not None else None
    num_slices, M, r_total = inputs.shape
    r_t = task_b[0].size(2) if task_b is not None else 0
    r_s = safety_b[0].size(1) if safety_b is not None else 0
    assert r_total == r_t + r_s, f"inputs rank {r_total} != r {r_t} + r_s {r_s}"
    assert output.dtype in _DTYPES and output.is_contiguous() and output.ndim == 2, "output: contiguous 2-D"
    out_sizes: list[int] = []
    for s in range(num_slices):
        n_t = task_b[s].size(1) if task_b is not None else None
        n_s = safety_b[s].size(0) if safety_b is not None else None
        assert n_t is None or n_s is None or n_t == n_s, f"slice {s}: lora_b out {n_t} != safety_b out {n_s}"
        out_sizes.append(int(n_t if n_t is not None else n_s))  # type: ignore[arg-type]
    if task_b is not None:
        assert len(task_b) == num_slices
        for w in task_b:
            assert w.dtype == output.dtype and w.is_contiguous(), (
                "lora_b_stacked: dtype of output, contiguous"
            )
            assert w.size(2) == r_t and w.size(0) == task_b[0].size(0)
    if safety_b is not None:
        assert len(safety_b) == num_slices
        for w in safety_b:
            assert w.dtype == output.dtype and w.is_contiguous(), "safety_b: dtype of output, contiguous"
            assert w.ndim == 2 and w.size(1) == r_s
    assert output.size(0) == M and output.size(1) >= offset_start + sum(out_sizes), "output too narrow"
    assert token_alpha.dtype == torch.float32 and token_alpha.numel() >= M
    assert token_lora_mapping.size(0) == M == token_indices_sorted_by_lora_ids.size(0)
    assert lora_ids.size(0) == num_tokens_per_lora.size(0)
    assert lora_token_start_loc.size(0) == lora_ids.size(0) + 1

    max_n = max(out_sizes)
    cfg = config or _default_expand_config(M, max_n, r_t, r_s)
    table = _table(
        output.device,
        num_slices,
        task_b=task_b,
        safe_b=safety_b,
        out_sizes=out_sizes,
        offset_start=offset_start,
    )
    groups = int(num_active_groups) if isinstance(num_active_groups, int) else int(num_active_groups.item())
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(max_n, cfg.block_n), num_slices, groups)
    constexprs, num_warps, num_stages = expand_launch(
        cfg,
        dtype=output.dtype,
        max_n=max_n,
        has_task=task_b is not None,
        has_safety=safety_b is not None,
        add_inputs=add_inputs,
        capability=_capability(output),
        interpreter=_interpreting(),
    )
    b0 = task_b[0] if task_b is not None else None
    s0 = safety_b[0] if safety_b is not None else None
    _fused_expand_kernel[grid](
        inputs,
        table,
        token_alpha,
        output,
        M,
        r_t,
        r_s,
        token_indices_sorted_by_lora_ids,
        num_tokens_per_lora,
        lora_token_start_loc,
        lora_ids,
        inputs.stride(0),
        inputs.stride(1),
        inputs.stride(2),
        b0.stride(1) if b0 is not None else 0,
        b0.stride(2) if b0 is not None else 0,
        s0.stride(0) if s0 is not None else 0,
        s0.stride(1) if s0 is not None else 0,
        output.stride(0),
        output.stride(1),
        **constexprs,
        num_warps=num_warps,
        num_stages=num_stages,
    )
