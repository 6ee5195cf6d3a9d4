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

Decisions (keep in sync with ``kernels/torch_ops/fused_safety_lora.py``):

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

Layout of this package: the shrink kernel and its launcher in ``fused_safety_lora_shrink.py``, the
expand in ``fused_safety_lora_expand.py``, the metadata and shared helpers in
``fused_safety_lora_meta.py``; here :func:`fused_safety_lora` (shrink + expand) and the torch custom
op ``torch.ops.safeguard.fused_safety_lora`` around it. Nothing here imports vLLM or
``vllm_safeguard`` (the GPU benchmark machine has torch + triton only), so the metadata helper
:class:`SafetyLoRAKernelMeta` mirrors ``vllm.lora.ops.triton_ops.LoRAKernelMeta``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from .fused_safety_lora_expand import ExpandConfig, fused_safety_expand
from .fused_safety_lora_meta import SafetyLoRAMetaArgs, _as_3d
from .fused_safety_lora_shrink import ShrinkConfig, fused_safety_shrink

__all__ = ["OP_NAME", "fused_safety_lora", "register_fused_safety_lora_op"]


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
    ``kernels.torch_ops.fused_safety_lora.fused_safety_lora_ref`` for the exact reference.
    """
    if x.size(0) == 0 or bool(skip_flag_cpu.item()):
        return
    num_slices = len(lora_a_stacked) if lora_a_stacked is not None else len(safety_a or ())
    r_t = _as_3d(lora_a_stacked[0], "lora_a_stacked").size(1) if lora_a_stacked is not None else 0
    r_s = safety_a[0].size(0) if safety_a is not None else 0
    x2 = x.view(-1, x.shape[-1])
    # fp32 buffer, like vLLM's add_lora_linear (https://github.com/triton-lang/triton/issues/1387).
    buffer = torch.empty((num_slices, x2.size(0), r_t + r_s), dtype=torch.float32, device=x.device)
    meta = SafetyLoRAMetaArgs(
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


# --------------------------------------------------------------------------------------------------
# torch custom op (one opaque op for torch.compile, as vLLM registers its lora_shrink / lora_expand)
# --------------------------------------------------------------------------------------------------

OP_NAME = "safeguard::fused_safety_lora"

# The op's parameters are those of fused_safety_lora, in the same order, less the ones a schema cannot
# carry (the launch configs) or the serving path does not pass (offset_start), with schema types:
_NOT_IN_OP = ("offset_start", "shrink_config", "expand_config")
_OP_TYPES: dict[str, Any] = {
    "lora_a_stacked": list[torch.Tensor],
    "lora_b_stacked": list[torch.Tensor],
    "safety_a": list[torch.Tensor],
    "safety_b": list[torch.Tensor],
    "num_active_groups": torch.Tensor,
}
_OP_REGISTERED = False


def _op_signature() -> inspect.Signature:
    """:func:`fused_safety_lora`'s signature as the op takes it (no defaults, schema types)."""
    sig = inspect.signature(fused_safety_lora, eval_str=True)
    params = [
        p.replace(annotation=_OP_TYPES.get(p.name, p.annotation), default=inspect.Parameter.empty)
        for p in sig.parameters.values()
        if p.name not in _NOT_IN_OP
    ]
    return sig.replace(parameters=params, return_annotation=None)


def register_fused_safety_lora_op() -> None:
    """Define ``torch.ops.safeguard.fused_safety_lora`` (idempotent): :func:`fused_safety_lora` as
    one custom op that mutates ``y``, with a no-op fake implementation. Its schema (inferred from
    :func:`fused_safety_lora`'s signature; callers pass every argument positionally, in this order)::

        (Tensor(a0!) y, Tensor x, Tensor[] lora_a_stacked, Tensor[] lora_b_stacked,
         Tensor[] safety_a, Tensor[] safety_b, Tensor token_alpha, Tensor token_lora_mapping,
         Tensor token_indices_sorted_by_lora_ids, Tensor num_tokens_per_lora,
         Tensor lora_token_start_loc, Tensor lora_ids, Tensor skip_flag_cpu,
         Tensor num_active_groups, float scaling, bool add_inputs) -> ()

    i.e. ``y, x``, the four weight lists, ``token_alpha``, the seven
    :meth:`SafetyLoRAKernelMeta.meta_args` tensors, ``scaling``, ``add_inputs``.
    """
    global _OP_REGISTERED
    if _OP_REGISTERED:
        return
    signature = _op_signature()

    def impl(*args: Any, **kwargs: Any) -> None:
        fused_safety_lora(**signature.bind(*args, **kwargs).arguments)

    impl.__signature__ = signature  # type: ignore[attr-defined]  # custom_op infers the schema from it
    op = torch.library.custom_op(OP_NAME, impl, mutates_args=("y",))

    @op.register_fake  # type: ignore[misc]
    def _(*args: Any, **kwargs: Any) -> None:
        return None

    _OP_REGISTERED = True
