"""Torch reference of the fused task-LoRA + safety-delta punica ops (CPU path and test oracle).

Same signatures as the Triton wrappers in ``kernels/triton_ops/fused_safety_lora{,_shrink,_expand}.py``
(keep in sync), so a punica wrapper can pick either; torch only, so it imports where triton is
missing. The sorted-by-adapter metadata arguments are accepted but not needed here (defaults
``None``): the semantics are defined on ``token_lora_mapping`` alone.

Numerics match the kernels: products accumulated in fp32, the shrink buffer is fp32, the expand
rounds that buffer to the weight dtype before multiplying (as vLLM's expand kernel does), and
``y + delta`` is formed in fp32 and rounded once. The task and safety contributions are computed by
separate GEMMs and only summed where ``alpha != 0``: that makes alpha 0 bit-identical to the run
without a safety delta by construction (one fused GEMM over the concatenated rank would not be,
since BLAS may pick a different summation order for another K).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["fused_safety_expand_ref", "fused_safety_lora_ref", "fused_safety_shrink_ref"]


def _as_3d(w: torch.Tensor) -> torch.Tensor:
    if w.ndim == 4:  # vLLM's [max_loras, 1, *, *]
        w = w.squeeze(1)
    if w.ndim != 3:
        raise ValueError(f"expected stacked LoRA weights [max_loras, *, *], got shape {tuple(w.shape)}")
    return w


def _groups(mapping: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(adapter id, token indices) per distinct id, -1 (no adapter) included."""
    ids = torch.unique(mapping).tolist()
    return [(int(i), (mapping == i).nonzero().squeeze(1)) for i in ids]


@torch.inference_mode()
def fused_safety_shrink_ref(
    inputs: torch.Tensor,  # [num_tokens, hidden_in]
    lora_a_stacked: Sequence[torch.Tensor] | None,  # num_slices x [max_loras, r, hidden_in]
    safety_a: Sequence[torch.Tensor] | None,  # num_slices x [r_s, hidden_in]
    token_alpha: torch.Tensor,  # [num_tokens] fp32
    output: torch.Tensor,  # [num_slices, num_tokens, r + r_s] fp32
    token_lora_mapping: torch.Tensor,  # [num_tokens], -1 = no task adapter
    token_indices_sorted_by_lora_ids: torch.Tensor | None = None,
    num_tokens_per_lora: torch.Tensor | None = None,
    lora_token_start_loc: torch.Tensor | None = None,
    lora_ids: torch.Tensor | None = None,
    skip_flag_cpu: torch.Tensor | None = None,
    num_active_groups: torch.Tensor | int | None = None,
    scaling: float = 1.0,
    config: Any = None,
) -> None:
    """Fused shrink: task rank and safety rank side by side in one fp32 buffer.

    Semantics:
        r = lora_a_stacked[0].shape[-2] (0 if None); r_s = safety_a[0].shape[0] (0 if None)
        for s in range(num_slices):
            for t in range(num_tokens):
                i = token_lora_mapping[t]
                output[s, t, :r]      = scaling * (x[t] @ lora_a_stacked[s][i].T) if i >= 0 else 0
                output[s, t, r:r+r_s] = alpha[t] * (x[t] @ safety_a[s].T)
        (x, weights in fp32; a token with no adapter still gets its safety columns)
    """
    m = inputs.size(0)
    if m == 0:
        return
    if lora_a_stacked is None and safety_a is None:
        raise ValueError("need task or safety weights")
    task_a = [_as_3d(w) for w in lora_a_stacked] if lora_a_stacked is not None else None
    r_t = task_a[0].size(1) if task_a is not None else 0
    r_s = safety_a[0].size(0) if safety_a is not None else 0
    num_slices = len(task_a) if task_a is not None else len(safety_a)  # type: ignore[arg-type]
    if tuple(output.shape) != (num_slices, m, r_t + r_s):
        raise ValueError(f"output shape {tuple(output.shape)} != {(num_slices, m, r_t + r_s)}")
    x = inputs.float()
    alpha = token_alpha[:m].float()
    mapping = token_lora_mapping[:m].long()
    output.zero_()
    for s in range(num_slices):
        if safety_a is not None:
            # Same for every token: one GEMM over the whole batch, then the per-token alpha.
            output[s, :, r_t:] = (x @ safety_a[s].float().T) * alpha[:, None]
        if task_a is not None:
            for lid, rows in _groups(mapping):
                if lid >= 0:
                    output[s, rows, :r_t] = (x[rows] @ task_a[s][lid].float().T) * scaling


@torch.inference_mode()
def fused_safety_expand_ref(
    inputs: torch.Tensor,  # [num_slices, num_tokens, r + r_s] fp32
    lora_b_stacked: Sequence[torch.Tensor] | None,  # num_slices x [max_loras, out_slice, r]
    safety_b: Sequence[torch.Tensor] | None,  # num_slices x [out_slice, r_s]
    token_alpha: torch.Tensor,  # [num_tokens] fp32
    output: torch.Tensor,  # [num_tokens, >= offset_start + sum(out_slice)]
    token_lora_mapping: torch.Tensor,  # [num_tokens]
    token_indices_sorted_by_lora_ids: torch.Tensor | None = None,
    num_tokens_per_lora: torch.Tensor | None = None,
    lora_token_start_loc: torch.Tensor | None = None,
    lora_ids: torch.Tensor | None = None,
    skip_flag_cpu: torch.Tensor | None = None,
    num_active_groups: torch.Tensor | int | None = None,
    offset_start: int = 0,
    add_inputs: bool = True,
    config: Any = None,
) -> None:
    """Fused expand over the rank-concatenated buffer.

    Semantics:
        offset = offset_start
        for s in range(num_slices):
            n = out_slice[s]
            for t in range(num_tokens):
                i = token_lora_mapping[t]
                if i < 0 and alpha[t] == 0:
                    continue                                   # row untouched
                b = round_to(w_dtype, inputs[s, t])            # as the kernel feeds the tensor cores
                delta = b[:r] @ lora_b_stacked[s][i].T if i >= 0 else 0
                if alpha[t] != 0:
                    delta = delta + b[r:] @ safety_b[s].T      # alpha already applied in the shrink
                base = y[t, offset:offset+n] if add_inputs else 0
                y[t, offset:offset+n] = round_to(y.dtype, base + delta)   # fp32 sum, one rounding
            offset += n
    """
    if inputs.size(1) == 0:
        return
    if lora_b_stacked is None and safety_b is None:
        raise ValueError("need task or safety weights")
    task_b = [_as_3d(w) for w in lora_b_stacked] if lora_b_stacked is not None else None
    num_slices, m, r_total = inputs.shape
    r_t = task_b[0].size(2) if task_b is not None else 0
    r_s = safety_b[0].size(1) if safety_b is not None else 0
    if r_total != r_t + r_s:
        raise ValueError(f"buffer rank {r_total} != r {r_t} + r_s {r_s}")
    alpha = token_alpha[:m].float()
    has_alpha = alpha != 0 if safety_b is not None else torch.zeros(m, dtype=torch.bool, device=alpha.device)
    mapping = token_lora_mapping[:m].long()
    w_dtype = output.dtype
    offset = offset_start
    for s in range(num_slices):
        n = task_b[s].size(1) if task_b is not None else safety_b[s].size(0)  # type: ignore[index]
        cols = slice(offset, offset + n)
        buf = inputs[s].to(w_dtype).float()
        safe_rows = has_alpha.nonzero().squeeze(1)
        delta_s = buf[safe_rows, r_t:] @ safety_b[s].float().T if safety_b is not None else None
        # Position of each token inside safe_rows (only read where has_alpha).
        pos = torch.cumsum(has_alpha.long(), 0) - 1
        for lid, rows in _groups(mapping):
            if lid >= 0 and task_b is not None:
                delta = buf[rows, :r_t] @ task_b[s][lid].float().T
                write = rows
                if delta_s is not None:
                    sel = has_alpha[rows]
                    delta[sel] = delta[sel] + delta_s[pos[rows[sel]]]
            else:
                sel = has_alpha[rows]
                write = rows[sel]
                if write.numel() == 0 or delta_s is None:
                    continue
                delta = delta_s[pos[write]]
            base = output[write, cols].float() if add_inputs else 0.0
            output[write, cols] = (base + delta).to(output.dtype)
        offset += n


def fused_safety_lora_ref(
    y: torch.Tensor,  # [num_tokens, sum(out_slice)]
    x: torch.Tensor,  # [num_tokens, hidden_in]
    lora_a_stacked: Sequence[torch.Tensor] | None,
    lora_b_stacked: Sequence[torch.Tensor] | None,
    safety_a: Sequence[torch.Tensor] | None,
    safety_b: Sequence[torch.Tensor] | None,
    token_alpha: torch.Tensor,
    token_lora_mapping: torch.Tensor,
    token_indices_sorted_by_lora_ids: torch.Tensor | None = None,
    num_tokens_per_lora: torch.Tensor | None = None,
    lora_token_start_loc: torch.Tensor | None = None,
    lora_ids: torch.Tensor | None = None,
    skip_flag_cpu: torch.Tensor | None = None,
    num_active_groups: torch.Tensor | int | None = None,
    scaling: float = 1.0,
    offset_start: int = 0,
    add_inputs: bool = True,
    shrink_config: Any = None,
    expand_config: Any = None,
) -> None:
    """``add_lora_linear`` plus the per-token safety delta (reference).

    Semantics:
        for each slice s (output columns offset_s .. offset_s + n_s) and token t with i = mapping[t]:
            y[t, slice s] += scaling * (x[t] @ A_i[s].T) @ B_i[s].T     (if i >= 0)
                           + alpha[t] * (x[t] @ A_s[s].T) @ B_s[s].T     (if alpha[t] != 0)
        tokens with i == -1 and alpha == 0 are left untouched.
    """
    if x.size(0) == 0:
        return
    x2 = x.reshape(-1, x.shape[-1])
    num_slices = len(lora_a_stacked) if lora_a_stacked is not None else len(safety_a or ())
    r_t = _as_3d(lora_a_stacked[0]).size(1) if lora_a_stacked is not None else 0
    r_s = safety_a[0].size(0) if safety_a is not None else 0
    buffer = torch.empty((num_slices, x2.size(0), r_t + r_s), dtype=torch.float32, device=x.device)
    fused_safety_shrink_ref(
        x2, lora_a_stacked, safety_a, token_alpha, buffer, token_lora_mapping, scaling=scaling
    )
    fused_safety_expand_ref(
        buffer,
        lora_b_stacked,
        safety_b,
        token_alpha,
        y.view(-1, y.shape[-1]),
        token_lora_mapping,
        offset_start=offset_start,
        add_inputs=add_inputs,
    )
