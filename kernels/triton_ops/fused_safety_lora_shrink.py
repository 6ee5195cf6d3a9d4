"""Fused shrink of task LoRA + safety delta (punica layout): one pass over ``x`` for both ranks.

Semantics (per slice ``s`` and token ``t`` with task adapter ``i = token_lora_mapping[t]``)::

    buffer[s, t, :r]      = scaling * x[t] A_i[s]^T      (0 for tokens without a task adapter)
    buffer[s, t, r:r+r_s] = alpha[t] * x[t] A_s[s]^T

Both dots share each loaded ``x`` tile; ``alpha`` is applied here, not in the expand (see the design
notes in ``fused_safety_lora.py``; torch reference: ``kernels/torch_ops/fused_safety_lora.py``).
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
    _dot_precision,
    _interpreting,
    _pow2_clamp,
    _table,
    _upcast,
)

__all__ = ["ShrinkConfig", "fused_safety_shrink", "shrink_launch"]


@dataclass(frozen=True)
class ShrinkConfig:
    """Shrink launch parameters. ``block_k``/``split_k`` fix the summation order of ``x @ A^T``."""

    block_m: int = 16
    block_n: int = 16
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def _default_shrink_config(
    m: int, k: int, r_t: int, r_s: int, interpreter: bool | None = None
) -> ShrinkConfig:
    """Defaults. Nothing that sets the summation order of the task columns (block_k, split_k, and
    block_n, which sets the BLAS call shape in the interpreter) depends on ``r_s``, so adding a safety
    delta never changes the task part's bits."""
    # BLOCK_N spans the whole task rank (up to 64); when r_s <= r, as usual, the same program also
    # computes the safety columns from the same x tiles (one read of x for both).
    block_n = _pow2_clamp(r_t if r_t else r_s, 16, 64)
    if _interpreting() if interpreter is None else interpreter:
        # The interpreter pays per program and per loop trip: few, large blocks.
        return ShrinkConfig(block_m=_pow2_clamp(m, 16, 32), block_n=block_n, block_k=_pow2_clamp(k, 16, 128))
    # Tiles measured on sm_90 (AOT, tests/kernels/test_fused_safety_lora_aot.py): with the hidden tile at
    # 128 a 64-wide rank tile spilled 1.7-2.9 KB (two fp32 accumulators, one x tile, two weight tiles),
    # and a 64 x 64 x 128 prefill tile 1.5 KB at 4 warps. The hidden tile shrinks as the rank tile
    # grows (it depends on r, never on r_s), and prefill tiles get 8 warps.
    block_m = 16 if m <= 16 else (32 if m <= 256 else 64)
    block_k = 128 if block_n <= 16 else (64 if block_n <= 32 else 32)
    # Few tokens => few CTAs along M/N; split the long K (hidden) axis across CTAs, as vLLM does.
    split_k = max(1, min(triton.cdiv(k, block_k) // 4, 16)) if m <= 128 else 1
    num_warps = 8 if block_m == 64 else 4
    return ShrinkConfig(
        block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps
    )


def shrink_launch(
    cfg: ShrinkConfig,
    *,
    dtype: torch.dtype,
    k: int,
    r_t: int,
    r_s: int,
    has_task: bool,
    has_safety: bool,
    interpreter: bool = False,
) -> tuple[dict[str, Any], int, int]:
    """``(constexprs, num_warps, num_stages)`` of one shrink launch: the launcher and the AOT compile
    (``aot.py``) build the same kernel variant from it."""
    constexprs = {
        "N_MAX": max(r_t, r_s),
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "SPLIT_K": cfg.split_k,
        "EVEN_K": k % (cfg.block_k * cfg.split_k) == 0,
        "HAS_TASK": has_task,
        "HAS_SAFETY": has_safety,
        "UPCAST": _upcast(dtype, interpreter),
        "DOT_PRECISION": _dot_precision(dtype),
        "TABLE_W": _T_WIDTH,
    }
    return constexprs, cfg.num_warps, cfg.num_stages


@triton.jit
def _fused_shrink_kernel(
    x_ptr,  # [M, K]
    table_ptr,  # [S, _T_WIDTH] int64
    alpha_ptr,  # [M] fp32
    out_ptr,  # [S, M, R_T + R_S] fp32
    M,
    K,
    R_T,
    R_S,
    sorted_token_ids_ptr,
    num_tokens_per_lora_ptr,
    lora_token_start_loc_ptr,
    lora_ids_ptr,
    task_scale,
    x_stride0,
    x_stride1,
    a_stride0,
    a_stride1,
    a_stride2,
    as_stride0,
    as_stride1,
    out_stride0,
    out_stride1,
    out_stride2,
    N_MAX: tl.constexpr,  # max(R_T, R_S): the N-blocks cover task and safety columns at once
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_TASK: tl.constexpr,
    HAS_SAFETY: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bf16: tl.dot on bf16 is wrong there, so dot in fp32
    DOT_PRECISION: tl.constexpr,
    TABLE_W: tl.constexpr,
):
    num_n = tl.cdiv(N_MAX, BLOCK_N)
    pid = tl.program_id(axis=0)
    pid_sk = pid % SPLIT_K
    pid_mn = pid // SPLIT_K
    pid_n = pid_mn % num_n
    pid_m = pid_mn // num_n
    slice_id = tl.program_id(axis=1)
    group = tl.program_id(axis=2)

    lora_id = tl.load(lora_ids_ptr + group)
    m_size = tl.load(num_tokens_per_lora_ptr + group)
    m_off = pid_m * BLOCK_M
    if m_off >= m_size:
        # Unused group slot (count 0) or a row block past this group's tokens.
        return
    m_len = tl.minimum(BLOCK_M, m_size - m_off)
    m_start = tl.load(lora_token_start_loc_ptr + group)
    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < m_len
    ram = tl.load(sorted_token_ids_ptr + m_start + m_off + offs_m, mask=row_mask, other=0).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    task_n_mask = offs_n < R_T
    safe_n_mask = offs_n < R_S
    if HAS_TASK:
        do_task = (lora_id >= 0) & (pid_n * BLOCK_N < R_T)
    else:
        do_task = lora_id < -1  # always False, same type as the branch above
    if HAS_SAFETY:
        alpha = tl.load(alpha_ptr + ram, mask=row_mask, other=0.0)
        has_alpha = (alpha != 0.0) & row_mask & (pid_n * BLOCK_N < R_S)
    else:
        alpha = tl.zeros((BLOCK_M,), dtype=tl.float32)
        has_alpha = offs_m < 0
    # Skip the safety dot for row blocks whose alphas are all 0 (e.g. requests that opted out).
    do_safe = tl.max(has_alpha.to(tl.int32), axis=0) > 0

    work = do_task | do_safe
    if SPLIT_K > 1:  # noqa: SIM102 -- constexpr test outside, runtime test inside (no `and` mixing)
        if not work:
            # The wrapper zeroed the buffer (atomics need it); nothing to add.
            return

    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if work:
        w_ty = x_ptr.dtype.element_ty
        offs_k = pid_sk * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + ram[:, None] * x_stride0 + offs_k[None, :] * x_stride1
        # For lora_id == -1 the task pointers are built from slot 0 but never dereferenced.
        a_base = tl.load(table_ptr + slice_id * TABLE_W + 0).to(tl.pointer_type(w_ty))
        a_ptrs = (
            a_base
            + tl.maximum(lora_id, 0).to(tl.int64) * a_stride0
            + offs_n[None, :] * a_stride1
            + offs_k[:, None] * a_stride2
        )
        as_base = tl.load(table_ptr + slice_id * TABLE_W + 1).to(tl.pointer_type(w_ty))
        as_ptrs = as_base + offs_n[None, :] * as_stride0 + offs_k[:, None] * as_stride1
        for k0 in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
            # One x tile feeds both dots: this is where the fused shrink saves the second x read.
            if EVEN_K:
                x_tile = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
                k_mask = offs_k < K  # all true; keeps the masks below uniform
            else:
                k_mask = offs_k + k0 * BLOCK_K * SPLIT_K < K
                x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                x_tile = x_tile.to(tl.float32)
            if HAS_TASK:  # noqa: SIM102 -- constexpr test outside, runtime test inside (no `and` mixing)
                if do_task:
                    a_tile = tl.load(a_ptrs, mask=k_mask[:, None] & task_n_mask[None, :], other=0.0)
                    if UPCAST:
                        a_tile = a_tile.to(tl.float32)
                    acc_t += tl.dot(x_tile, a_tile, input_precision=DOT_PRECISION)
            if HAS_SAFETY:  # noqa: SIM102 -- constexpr test outside, runtime test inside (no `and` mixing)
                if do_safe:
                    s_tile = tl.load(as_ptrs, mask=k_mask[:, None] & safe_n_mask[None, :], other=0.0)
                    if UPCAST:
                        s_tile = s_tile.to(tl.float32)
                    acc_s += tl.dot(x_tile, s_tile, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * SPLIT_K * x_stride1
            a_ptrs += BLOCK_K * SPLIT_K * a_stride2
            as_ptrs += BLOCK_K * SPLIT_K * as_stride1

    out_rows = out_ptr + slice_id * out_stride0 + ram[:, None] * out_stride1
    # Task columns [0, R_T): scaled by the (usually 1.0) LoRA scaling; written as 0 for tokens
    # without an adapter so the buffer is fully defined without a memset.
    t_ptrs = out_rows + offs_n[None, :] * out_stride2
    t_mask = row_mask[:, None] & task_n_mask[None, :]
    # Safety columns [R_T, R_T + R_S): scaled per token by alpha.
    s_ptrs = out_rows + (R_T + offs_n)[None, :] * out_stride2
    s_mask = row_mask[:, None] & safe_n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_TASK:
            tl.store(t_ptrs, acc_t * task_scale, mask=t_mask)
        if HAS_SAFETY:
            tl.store(s_ptrs, acc_s * alpha[:, None], mask=s_mask)
    else:
        if HAS_TASK:
            tl.atomic_add(t_ptrs, acc_t * task_scale, mask=t_mask, sem="relaxed")
        if HAS_SAFETY:
            tl.atomic_add(s_ptrs, acc_s * alpha[:, None], mask=s_mask, sem="relaxed")


@torch.inference_mode()
def fused_safety_shrink(
    inputs: torch.Tensor,  # [num_tokens, hidden_in]
    lora_a_stacked: Sequence[torch.Tensor]
    | None,  # num_slices x [max_loras, r, hidden_in] (or [L, 1, r, in])
    safety_a: Sequence[torch.Tensor] | None,  # num_slices x [r_s, hidden_in]
    token_alpha: torch.Tensor,  # [num_tokens] fp32
    output: torch.Tensor,  # [num_slices, num_tokens, r + r_s] fp32
    token_lora_mapping: torch.Tensor,  # [num_tokens] int32, -1 = no task adapter
    token_indices_sorted_by_lora_ids: torch.Tensor,  # [num_tokens]
    num_tokens_per_lora: torch.Tensor,  # [max_loras + 1]
    lora_token_start_loc: torch.Tensor,  # [max_loras + 2]
    lora_ids: torch.Tensor,  # [max_loras + 1]
    skip_flag_cpu: torch.Tensor,  # [1] bool CPU: no adapter and alpha == 0 everywhere
    num_active_groups: torch.Tensor | int,  # CPU [1] or int: groups to launch (<= max_loras + 1)
    scaling: float = 1.0,
    config: ShrinkConfig | None = None,
) -> None:
    """Fused shrink. Fills ``output`` (see module docstring); ``r = 0`` if ``lora_a_stacked`` is None
    (safety-only pass) and ``r_s = 0`` if ``safety_a`` is None (plain task-LoRA pass)."""
    assert skip_flag_cpu.numel() == 1
    if inputs.size(0) == 0 or bool(skip_flag_cpu.item()):
        return
    assert lora_a_stacked is not None or safety_a is not None, "need task or safety weights"
    assert inputs.ndim == 2 and inputs.dtype in _DTYPES, f"inputs: {inputs.dtype} {tuple(inputs.shape)}"
    inputs = inputs.contiguous()
    M, K = inputs.shape
    task_a = [_as_3d(w, "lora_a_stacked") for w in lora_a_stacked] if lora_a_stacked is not None else None
    num_slices = len(task_a) if task_a is not None else len(safety_a)  # type: ignore[arg-type]
    r_t = task_a[0].size(1) if task_a is not None else 0
    r_s = safety_a[0].size(0) if safety_a is not None else 0
    for w in task_a or ():
        assert w.dtype == inputs.dtype and w.is_contiguous(), "lora_a_stacked: dtype of inputs, contiguous"
        assert w.shape == task_a[0].shape and w.size(2) == K, f"lora_a_stacked: {tuple(w.shape)}, K={K}"  # type: ignore[index]
    if safety_a is not None:
        assert len(safety_a) == num_slices, "safety_a: one tensor per slice"
        for w in safety_a:
            assert w.dtype == inputs.dtype and w.is_contiguous(), "safety_a: dtype of inputs, contiguous"
            assert tuple(w.shape) == (r_s, K), f"safety_a: expected {(r_s, K)}, got {tuple(w.shape)}"
    assert token_alpha.dtype == torch.float32 and token_alpha.numel() >= M, "token_alpha: fp32 [num_tokens]"
    assert output.dtype == torch.float32 and output.is_contiguous(), "output: contiguous fp32"
    assert tuple(output.shape) == (num_slices, M, r_t + r_s), f"output: {tuple(output.shape)}"
    assert token_lora_mapping.size(0) == M == token_indices_sorted_by_lora_ids.size(0)
    assert lora_ids.size(0) == num_tokens_per_lora.size(0)
    assert lora_token_start_loc.size(0) == lora_ids.size(0) + 1

    cfg = config or _default_shrink_config(M, K, r_t, r_s)
    if cfg.split_k > 1:
        output.zero_()  # partial sums are atomically added
    table = _table(inputs.device, num_slices, task_a=task_a, safe_a=safety_a)
    groups = int(num_active_groups) if isinstance(num_active_groups, int) else int(num_active_groups.item())
    n_max = max(r_t, r_s)
    grid = (cfg.split_k * triton.cdiv(M, cfg.block_m) * triton.cdiv(n_max, cfg.block_n), num_slices, groups)
    constexprs, num_warps, num_stages = shrink_launch(
        cfg,
        dtype=inputs.dtype,
        k=K,
        r_t=r_t,
        r_s=r_s,
        has_task=task_a is not None,
        has_safety=safety_a is not None,
        interpreter=_interpreting(),
    )
    a0 = task_a[0] if task_a is not None else None
    s0 = safety_a[0] if safety_a is not None else None
    _fused_shrink_kernel[grid](
        inputs,
        table,
        token_alpha,
        output,
        M,
        K,
        r_t,
        r_s,
        token_indices_sorted_by_lora_ids,
        num_tokens_per_lora,
        lora_token_start_loc,
        lora_ids,
        float(scaling),
        inputs.stride(0),
        inputs.stride(1),
        a0.stride(0) if a0 is not None else 0,
        a0.stride(1) if a0 is not None else 0,
        a0.stride(2) if a0 is not None else 0,
        s0.stride(0) if s0 is not None else 0,
        s0.stride(1) if s0 is not None else 0,
        output.stride(0),
        output.stride(1),
        output.stride(2),
        **constexprs,
        num_warps=num_warps,
        num_stages=num_stages,
    )
