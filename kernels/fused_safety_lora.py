"""Fused multi-LoRA + per-token safety-delta Triton kernels (punica layout).

Every LoRA-wrapped linear computes, per token ``t`` with task adapter ``i = token_lora_mapping[t]``::

    y[t] += scaling * (x[t] @ A_i^T) @ B_i^T  +  alpha[t] * (x[t] @ A_s^T) @ B_s^T

where ``(A_i, B_i)`` is the task LoRA held in vLLM's stacked slots and ``(A_s, B_s)`` is the cached
safety delta of this module (the same for every token). Instead of two punica passes (two shrinks
+ two expands, ``y`` read/written twice, ``x`` read twice) we run ONE shrink and ONE expand:

* shrink writes the task and safety ranks side by side into one fp32 buffer
  ``buffer[slice, t, :r] = scaling * x A_i^T`` and ``buffer[slice, t, r:r+r_s] = alpha[t] * x A_s^T``
  from a single pass over ``x`` (both dots share each loaded ``x`` tile);
* expand computes ``buffer[slice, t] @ [B_i ; B_s]^T`` (rank-concatenated B) and adds it to ``y``
  in one read-modify-write.

Token layout is vLLM's (``LoRAKernelMeta``): tokens are grouped by adapter slot through
``token_indices_sorted_by_lora_ids`` / ``num_tokens_per_lora`` / ``lora_token_start_loc`` /
``lora_ids``; grid axis 2 enumerates the groups. Unlike vLLM, the group whose id is ``-1`` (tokens
without a task adapter) is *not* skipped: those tokens still receive ``alpha[t] * (x A_s^T) B_s^T``.

Decisions (keep in sync with ``vllm_safeguard/ops/fused_safety_lora_ref.py``):

* Tokens without a task adapter get the safety delta whenever ``alpha[t] != 0``. The kernel is
  policy-free: whoever fills ``token_alpha`` decides (e.g. alpha 0 for base-model requests).
* ``alpha[t] == 0`` is exact: the expand keeps the task and safety partial sums in separate fp32
  accumulators and only adds the safety one where ``alpha != 0``, and it never writes rows that have
  neither a task adapter nor a non-zero alpha. So alpha 0 yields bit-for-bit the output of the same
  kernel run without any safety delta (``safety_a=None``), and leaves no-adapter tokens untouched.
  (With ``split_k > 1`` the shrink uses fp32 atomics, whose order is not deterministic on GPU, exactly
  as in vLLM's own shrink; pass ``ShrinkConfig(split_k=1)`` if run-to-run bit identity matters.)
* All products are accumulated in fp32. As in vLLM's expand, the fp32 shrink buffer is rounded to
  the weight dtype before the expand dot (tensor-core inputs); ``y + delta`` is then formed in fp32
  and rounded once to ``y``'s dtype.
* ``alpha`` is applied in the shrink, not the expand: there it scales ``r_s`` columns per token
  (e.g. 16) instead of ``out`` columns (e.g. 4096), and the expand stays a plain GEMM over the
  concatenated rank.

This module must not import vLLM (the GPU benchmark machine has torch + triton only), so the
metadata helper :class:`SafetyLoRAKernelMeta` mirrors ``vllm.lora.ops.triton_ops.LoRAKernelMeta``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "ExpandConfig",
    "SafetyLoRAKernelMeta",
    "ShrinkConfig",
    "fused_safety_expand",
    "fused_safety_lora",
    "fused_safety_shrink",
    "make_safety_lora_meta",
]

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


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


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

    # Separate accumulators: the safety sum is only added where alpha != 0, so alpha 0 is exact.
    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
                acc_t += tl.dot(a_tile, b_tile, input_precision=DOT_PRECISION)
    if HAS_SAFETY:  # noqa: SIM102 -- constexpr test outside, runtime test inside (no `and` mixing)
        if do_safe:
            bs_base = tl.load(row + 3).to(tl.pointer_type(w_ty))
            bs_ptrs = bs_base + offs_n[None, :] * bs_stride0
            for k0 in range(0, tl.cdiv(R_S, BLOCK_KS)):
                k_idx = k0 * BLOCK_KS + tl.arange(0, BLOCK_KS)
                k_mask = k_idx < R_S
                a_tile = tl.load(
                    buf_rows + (R_T + k_idx)[None, :] * buf_stride2,
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                b_tile = tl.load(
                    bs_ptrs + k_idx[:, None] * bs_stride1, mask=k_mask[:, None] & n_mask[None, :], other=0.0
                )
                a_tile = a_tile.to(w_ty)
                if UPCAST:
                    a_tile = a_tile.to(tl.float32)
                    b_tile = b_tile.to(tl.float32)
                acc_s += tl.dot(a_tile, b_tile, input_precision=DOT_PRECISION)

    acc = tl.where(has_alpha[:, None], acc_t + acc_s, acc_t)
    # Rows with neither a task adapter nor a non-zero alpha are not written at all.
    # (tl.where, not `has_alpha | do_task`: the interpreter turns vector|scalar bools into int32.)
    write_row = tl.where(do_task, row_mask, has_alpha)
    out_off = tl.load(row + 5)
    c_ptrs = y_ptr + ram[:, None] * y_stride0 + (out_off + offs_n)[None, :] * y_stride1
    c_mask = write_row[:, None] & n_mask[None, :]
    if ADD_INPUTS:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(w_ty), mask=c_mask)


# --------------------------------------------------------------------------------------------------
# Metadata (mirrors vllm.lora.ops.triton_ops.LoRAKernelMeta, without importing vLLM)
# --------------------------------------------------------------------------------------------------


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

    def meta_args(
        self, num_tokens: int, specialize_active_groups: bool = True
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
    ]:
        """``(token_lora_mapping, token_indices_sorted_by_lora_ids, num_tokens_per_lora,
        lora_token_start_loc, lora_ids, skip_flag_cpu, num_active_groups)`` -- the metadata
        arguments of the wrappers below, in order. ``specialize_active_groups=False`` launches
        ``max_loras + 1`` groups (extra ones exit at once): a stable grid for CUDA graph capture."""
        groups = self.num_active_groups_cpu if specialize_active_groups else self.default_num_groups_cpu
        return (
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
# Launch configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShrinkConfig:
    """Shrink launch parameters. ``block_k``/``split_k`` fix the summation order of ``x @ A^T``."""

    block_m: int = 16
    block_n: int = 16
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class ExpandConfig:
    """Expand launch parameters; the task and safety ranks are tiled separately."""

    block_m: int = 16
    block_n: int = 64
    block_k_task: int = 16
    block_k_safety: int = 16
    num_warps: int = 4
    num_stages: int = 2


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _default_shrink_config(m: int, k: int, r_t: int, r_s: int) -> ShrinkConfig:
    """Defaults. Nothing that sets the summation order of the task columns (block_k, split_k, and
    block_n, which sets the BLAS call shape in the interpreter) depends on ``r_s``, so adding a safety
    delta never changes the task part's bits."""
    # BLOCK_N spans the whole task rank (up to 64); when r_s <= r, as usual, the same program also
    # computes the safety columns from the same x tiles (one read of x for both).
    block_n = _pow2_clamp(r_t if r_t else r_s, 16, 64)
    if _interpreting():
        # The interpreter pays per program and per loop trip: few, large blocks.
        return ShrinkConfig(block_m=_pow2_clamp(m, 16, 32), block_n=block_n, block_k=_pow2_clamp(k, 16, 128))
    block_m = 16 if m <= 16 else (32 if m <= 256 else 64)
    block_k = 128
    # Few tokens => few CTAs along M/N; split the long K (hidden) axis across CTAs, as vLLM does.
    split_k = max(1, min(triton.cdiv(k, block_k) // 4, 16)) if m <= 128 else 1
    return ShrinkConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4)


def _default_expand_config(m: int, max_n: int, r_t: int, r_s: int) -> ExpandConfig:
    kt, ks = _pow2_clamp(r_t, 16, 64), _pow2_clamp(r_s, 16, 64)
    if _interpreting():
        return ExpandConfig(
            block_m=_pow2_clamp(m, 16, 32),
            block_n=_pow2_clamp(max_n, 16, 128),
            block_k_task=kt,
            block_k_safety=ks,
        )
    block_m = 16 if m <= 16 else (32 if m <= 256 else 64)
    return ExpandConfig(block_m=block_m, block_n=128, block_k_task=kt, block_k_safety=ks, num_warps=4)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 weights are for tests/debugging: keep them exact (no tf32) so they match the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _interpreting() and dtype == torch.bfloat16


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


# --------------------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------------------


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
        N_MAX=n_max,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        EVEN_K=K % (cfg.block_k * cfg.split_k) == 0,
        HAS_TASK=task_a is not None,
        HAS_SAFETY=safety_a is not None,
        UPCAST=_upcast(inputs.dtype),
        DOT_PRECISION=_dot_precision(inputs.dtype),
        TABLE_W=_T_WIDTH,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


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
        MAX_N=max_n,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_KT=cfg.block_k_task,
        BLOCK_KS=cfg.block_k_safety,
        HAS_TASK=task_b is not None,
        HAS_SAFETY=safety_b is not None,
        ADD_INPUTS=add_inputs,
        UPCAST=_upcast(output.dtype),
        DOT_PRECISION=_dot_precision(output.dtype),
        TABLE_W=_T_WIDTH,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def fused_safety_lora(
    y: torch.Tensor,  # [num_tokens, sum(out_slice)] (updated in place)
    x: torch.Tensor,  # [num_tokens, hidden_in]
    lora_a_stacked: Sequence[torch.Tensor] | None,  # num_slices x [max_loras, r, hidden_in]
    lora_b_stacked: Sequence[torch.Tensor] | None,  # num_slices x [max_loras, out_slice, r]
    safety_a: Sequence[torch.Tensor] | None,  # num_slices x [r_s, hidden_in]
    safety_b: Sequence[torch.Tensor] | None,  # num_slices x [out_slice, r_s]
    token_alpha: torch.Tensor,  # [num_tokens] fp32
    token_lora_mapping: torch.Tensor,
    token_indices_sorted_by_lora_ids: torch.Tensor,
    num_tokens_per_lora: torch.Tensor,
    lora_token_start_loc: torch.Tensor,
    lora_ids: torch.Tensor,
    skip_flag_cpu: torch.Tensor,
    num_active_groups: torch.Tensor | int,
    scaling: float = 1.0,
    offset_start: int = 0,
    add_inputs: bool = True,
    shrink_config: ShrinkConfig | None = None,
    expand_config: ExpandConfig | None = None,
) -> None:
    """``add_lora_linear`` with the safety delta: one fused shrink + one fused expand.

    Semantics: ``y[t] += scaling * x[t] A_i^T B_i^T + alpha[t] * x[t] A_s^T B_s^T`` per slice, see
    ``vllm_safeguard.ops.fused_safety_lora_ref`` for the exact reference.
    """
    if x.size(0) == 0 or bool(skip_flag_cpu.item()):
        return
    num_slices = len(lora_a_stacked) if lora_a_stacked is not None else len(safety_a or ())
    r_t = _as_3d(lora_a_stacked[0], "lora_a_stacked").size(1) if lora_a_stacked is not None else 0
    r_s = safety_a[0].size(0) if safety_a is not None else 0
    x2 = x.view(-1, x.shape[-1])
    # fp32 buffer, like vLLM's add_lora_linear (https://github.com/triton-lang/triton/issues/1387).
    buffer = torch.empty((num_slices, x2.size(0), r_t + r_s), dtype=torch.float32, device=x.device)
    meta = (
        token_lora_mapping,
        token_indices_sorted_by_lora_ids,
        num_tokens_per_lora,
        lora_token_start_loc,
        lora_ids,
        skip_flag_cpu,
        num_active_groups,
    )
    fused_safety_shrink(
        x2, lora_a_stacked, safety_a, token_alpha, buffer, *meta, scaling=scaling, config=shrink_config
    )
    fused_safety_expand(
        buffer,
        lora_b_stacked,
        safety_b,
        token_alpha,
        y.view(-1, y.shape[-1]),
        *meta,
        offset_start=offset_start,
        add_inputs=add_inputs,
        config=expand_config,
    )
