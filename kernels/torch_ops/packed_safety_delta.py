"""The CPU serving path's safety delta: one layer's per-token-scaled ``(x A_s^T) B_s^T``, few ops.

``fused_safety_lora_ref`` (same package) is the oracle: written for clarity, per slice and per
adapter group, it spends ~20 small torch calls per layer. On the CPU path vLLM computes the task LoRA
with its own ops, so only the safety delta is ours, and at decode sizes the reference's cost is call
overhead: on SmolLM2-135M's shapes (60 tokens, 15 selected layers x 4 modules, rank 16,
``benchmarks/bench_packed_safety_delta.py``) it took ~12 ms a step. Packed once per layer (all
slices' A side by side, each B transposed, fp32), the delta is one shrink GEMM for every slice, one
scale, and one expand GEMM per slice accumulating straight into the slice's columns of ``y``. A
block-diagonal B (one expand GEMM whose zero blocks double the arithmetic) was measured in the same
benchmark: 1.14x [1.13, 1.16] the time of this layout with every token at alpha != 0 (the serving
case), 0.94x [0.92, 0.98] with half the tokens gathered; the common case decided.

Semantics (``S`` slices of width ``n_s`` at column ``c_s``, safety rank ``r_s``; ``y`` ``[T, sum n_s]``)::

    packed.a_t    = [A_0; A_1; ...; A_{S-1}]^T               fp32 [in, S*r_s]
    packed.b_t[s] = B_s^T                                    fp32 [r_s, n_s]
    rows          = {t < T : alpha[t] != 0}                   (all rows: no gather)
    buf           = round_to(y.dtype, alpha[rows, None] * (x[rows] @ packed.a_t))   # as the kernels
    for s: y[rows, c_s:c_s+n_s] = round_to(y.dtype, y[rows, c_s:c_s+n_s]
                                            + buf[:, s*r_s:(s+1)*r_s] @ packed.b_t[s])   # fp32, once
    rows with alpha 0 are never written (bit-identical to no safety delta)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PackedSafety", "pack_safety", "packed_safety_delta"]


@dataclass(frozen=True)
class PackedSafety:
    """One layer's safety factors packed for :func:`packed_safety_delta` (see the module Semantics)."""

    a_t: torch.Tensor  # [in, S*r_s] fp32, contiguous
    b_t: tuple[torch.Tensor, ...]  # S x [r_s, n_s] fp32, contiguous
    columns: tuple[tuple[int, int], ...]  # S x (first column, width) of the slice in y

    @property
    def out_features(self) -> int:
        return sum(n for _, n in self.columns)


def pack_safety(safety_a: Sequence[torch.Tensor], safety_b: Sequence[torch.Tensor]) -> PackedSafety:
    """Pack per-slice factors (``A_s``: ``[r_s, in]``, ``B_s``: ``[n_s, r_s]``, any float dtype)."""
    if len(safety_a) != len(safety_b) or not safety_a:
        raise ValueError(f"need one A and one B per slice, got {len(safety_a)} A and {len(safety_b)} B")
    r_s, hidden_in = safety_a[0].shape
    for s, (a, b) in enumerate(zip(safety_a, safety_b, strict=True)):
        if tuple(a.shape) != (r_s, hidden_in) or b.ndim != 2 or b.shape[1] != r_s:
            raise ValueError(
                f"slice {s}: A {tuple(a.shape)} / B {tuple(b.shape)} do not match A_0 {(r_s, hidden_in)}"
            )
    a_t = torch.cat([a.float() for a in safety_a], dim=0).t().contiguous()
    b_t = tuple(b.float().t().contiguous() for b in safety_b)
    starts = [0]
    for b in safety_b[:-1]:
        starts.append(starts[-1] + int(b.shape[0]))
    return PackedSafety(a_t, b_t, tuple((c, int(b.shape[0])) for c, b in zip(starts, safety_b, strict=True)))


@torch.inference_mode()
def packed_safety_delta(
    y: torch.Tensor,  # [T, sum(n_s)], updated in place
    x: torch.Tensor,  # [T, in]
    packed: PackedSafety,
    token_alpha: torch.Tensor,  # [>= T] fp32
) -> None:
    """``y[t] += alpha[t] * (x[t] A_s^T) B_s^T`` for every slice and every token with alpha != 0."""
    m = x.size(0)
    if m == 0:
        return
    if y.shape != (m, packed.out_features) or x.shape[1] != packed.a_t.shape[0]:
        raise ValueError(
            f"y {tuple(y.shape)} / x {tuple(x.shape)} do not fit the packed safety factors "
            f"(in {packed.a_t.shape[0]}, out {packed.out_features})"
        )
    alpha = token_alpha[:m]
    nonzero = alpha != 0
    count = int(nonzero.sum())
    if count == 0:
        return
    rows = None if count == m else nonzero.nonzero().squeeze(1)
    xs = x if rows is None else x.index_select(0, rows)
    a = alpha if rows is None else alpha.index_select(0, rows)
    buf = torch.mm(xs.float(), packed.a_t).mul_(a.float().unsqueeze(1))
    if y.dtype != torch.float32:
        buf = buf.to(y.dtype).float()  # the kernels feed the expand with the buffer in the weight dtype
    direct = rows is None and y.dtype == torch.float32 and y.stride(1) == 1
    # fp32, every row: accumulate into y's own columns; else into an fp32 copy of the rows, written once
    acc = y if direct else (y if rows is None else y.index_select(0, rows)).float()
    r_s = packed.b_t[0].shape[0]
    for s, (b_t, (c, n)) in enumerate(zip(packed.b_t, packed.columns, strict=True)):
        acc[:, c : c + n].addmm_(buf[:, s * r_s : (s + 1) * r_s], b_t)
    if direct:
        return
    if rows is None:
        y.copy_(acc)
    else:
        y.index_copy_(0, rows, acc.to(y.dtype))
