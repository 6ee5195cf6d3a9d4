"""The DSA guard's score as one opaque op: ``torch.ops.safeguard.guard_score``.

Fixed-shape tensor work on persistent buffers, no host sync: traced once by torch.compile, replayed
inside CUDA graphs. The plugin places it after decoder layer L (``vllm_safeguard.integration.
guard_runner``) and fills its buffers before each step; it is here, beside the fused LoRA kernels, so
that it runs where only torch is installed (the GPU check machine has no vLLM).

Semantics (``n`` tokens in the pass, ``P`` pending slots)::

    h          = hidden + residual (residual None: hidden)                    [n, H]
    score[k]   = sigmoid(((h[pending_index[k]] - mean) / std) . weight + bias)   for k < P
    ramp_k     = clamp((logit(score[k]) - logit(ramp_low)) / (logit(thr) - logit(ramp_low)), 0, 1)
    alpha_k    = alpha_high if score[k] >= thr else alpha_low + (alpha_high - alpha_low) * ramp_k
                 (decision = [thr, alpha_low, alpha_high, ramp_low]; ramp_low = thr: two levels)
    token_alpha[t] = alpha_k  where token_pending[t] == k >= 0 and pending_valid[k], else unchanged
    scores     = score (read after the step for the valid slots)
"""

from __future__ import annotations

import threading
from typing import Any

import torch

GUARD_SCORE = "safeguard::guard_score"


def guard_score(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    pending_index: torch.Tensor,
    pending_valid: torch.Tensor,
    token_pending: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    decision: torch.Tensor,
    token_alpha: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    """The op's body (see the module Semantics). Shapes: hidden/residual ``[T, H]``; pending_index
    (int64), pending_valid (bool), scores (fp32) ``[P]``; token_pending (int64, -1 = none) and
    token_alpha (fp32) ``[max_tokens]``; weight/mean/std ``[H]``, bias ``[1]``, decision
    ``[threshold, alpha_low, alpha_high, ramp_low]`` fp32."""
    n = hidden.size(0)
    h = hidden if residual is None else hidden + residual
    picked = h.index_select(0, pending_index.clamp(max=n - 1)).float()
    z = ((picked - mean) / std) @ weight + bias
    s = torch.sigmoid(z)
    scores.copy_(s)
    # logit(score) is z itself (up to the clamp that keeps both ends finite).
    zl, zh = torch.logit(decision[3:4], eps=1e-7), torch.logit(decision[0:1], eps=1e-7)
    ramp = ((z.clamp(-16.0, 16.0) - zl) / (zh - zl).clamp_min(1e-6)).clamp(0.0, 1.0)
    alpha_k = torch.where(s >= decision[0], decision[2], decision[1] + (decision[2] - decision[1]) * ramp)
    owner = token_pending[:n]
    k = owner.clamp(min=0)
    take = (owner >= 0) & pending_valid[k]
    token_alpha[:n].copy_(torch.where(take, alpha_k[k], token_alpha[:n]))


_REGISTERED = False
_LOCK = threading.Lock()


def register_guard_score_op() -> None:
    """Define ``torch.ops.safeguard.guard_score`` (idempotent)."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return
        op = torch.library.custom_op(GUARD_SCORE, guard_score, mutates_args=("token_alpha", "scores"))

        @op.register_fake  # type: ignore[misc]
        def _(*args: Any, **kwargs: Any) -> None:
            return None

        _REGISTERED = True
