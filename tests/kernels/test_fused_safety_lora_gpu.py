"""GPU-only checks of the fused safety-LoRA kernels: realistic shapes in bf16/fp16, exactness of
alpha 0 with the compiled kernels, and CUDA-graph capture with alphas updated in place.

Skipped without CUDA, and under ``TRITON_INTERPRET=1`` (the interpreter suite is
``test_fused_safety_lora.py``). No timing assertions here; timings live in
``benchmarks/bench_fused_safety_lora.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import (
    SafetyLoRAKernelMeta,
    ShrinkConfig,
    fused_safety_lora,
    fused_safety_lora_ref,
    make_safety_lora_meta,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="compiled kernels only"),
]

DEV = "cuda"


def _weights(
    k: int, outs: tuple[int, ...], r: int, r_s: int, max_loras: int, dtype: torch.dtype, seed: int = 0
):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)

    return (
        [rnd(max_loras, r, k, scale=k**-0.5) for _ in outs],
        [rnd(max_loras, n, r, scale=r**-0.5) for n in outs],
        [rnd(r_s, k, scale=k**-0.5) for _ in outs],
        [rnd(n, r_s, scale=r_s**-0.5) for n in outs],
    )


def _batch(m: int, k: int, n: int, max_loras: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mapping = torch.randint(-1, max_loras, (m,), generator=g, dtype=torch.int32)
    alpha = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (m,), generator=g)]
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    y = torch.randn(m, n, generator=g).to(dtype).to(DEV)
    return x, y, mapping, alpha


# Llama-3-8B-like qkv (GQA) and gate_up, plus a TP=2 down_proj; decode and prefill token counts.
SHAPES = [
    (4096, (4096, 1024, 1024), 16, 16),
    (4096, (14336, 14336), 16, 16),
    (7168, (4096,), 64, 16),
    (4095, (1000, 127, 127), 8, 32),  # odd sizes
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 257, 2048])
@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: f"k{s[0]}_n{'x'.join(map(str, s[1]))}_r{s[2]}_rs{s[3]}"
)
def test_gpu_matches_reference(shape, m: int, dtype: torch.dtype) -> None:
    k, outs, r, r_s = shape
    la, lb, sa, sb = _weights(k, outs, r, r_s, 4, dtype)
    x, y0, mapping, alpha = _batch(m, k, sum(outs), 4, dtype)
    meta = make_safety_lora_meta(mapping, alpha, 4, DEV)
    got = y0.clone()
    fused_safety_lora(got, x, la, lb, sa, sb, meta.token_alpha[:m], *meta.meta_args(m))
    ref = y0.clone()
    fused_safety_lora_ref(ref, x, la, lb, sa, sb, alpha.to(DEV), mapping.to(DEV))
    # both round (y + delta) once to the output dtype; fp32 sums differ only in order
    torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_alpha_zero_bit_identical(dtype: torch.dtype) -> None:
    k, outs, r, r_s = SHAPES[0]
    la, lb, sa, sb = _weights(k, outs, r, r_s, 4, dtype)
    x, y0, mapping, alpha = _batch(64, k, sum(outs), 4, dtype)
    meta = make_safety_lora_meta(mapping, alpha, 4, DEV)
    cfg = ShrinkConfig(block_m=32, block_n=16, block_k=128, split_k=1)  # no atomics: deterministic
    fused, plain = y0.clone(), y0.clone()
    fused_safety_lora(fused, x, la, lb, sa, sb, meta.token_alpha[:64], *meta.meta_args(64), shrink_config=cfg)
    fused_safety_lora(
        plain, x, la, lb, None, None, meta.token_alpha[:64], *meta.meta_args(64), shrink_config=cfg
    )
    zero = (alpha == 0).to(DEV)
    untouched = zero & (mapping == -1).to(DEV)
    assert torch.equal(fused[zero], plain[zero])
    assert torch.equal(fused[untouched], y0[untouched])


def test_gpu_cuda_graph_alpha_in_place() -> None:
    """Capture once, then change adapters/alphas by refilling the metadata in place and replay."""
    dtype, m, max_loras = torch.bfloat16, 32, 4
    k, outs, r, r_s = SHAPES[0]
    la, lb, sa, sb = _weights(k, outs, r, r_s, max_loras, dtype)
    x, y0, mapping, alpha = _batch(m, k, sum(outs), max_loras, dtype)
    meta = SafetyLoRAKernelMeta.make(max_loras, m, DEV)
    meta.prepare_tensors(torch.zeros(m, dtype=torch.int32), torch.ones(m))  # capture with work to do
    y = y0.clone()
    args = meta.meta_args(m, specialize_active_groups=False)  # fixed grid across replays

    def step() -> None:
        y.copy_(y0)
        fused_safety_lora(y, x, la, lb, sa, sb, meta.token_alpha[:m], *args)

    step()  # warm up: compiles and caches the pointer tables outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (2, 3):
        _, _, mapping, alpha = _batch(m, k, sum(outs), max_loras, dtype, seed=seed)
        alpha[0] = 1.0  # keep the capture-time "something to do" assumption true
        meta.prepare_tensors(mapping, alpha)
        graph.replay()
        ref = y0.clone()
        fused_safety_lora_ref(ref, x, la, lb, sa, sb, alpha.to(DEV), mapping.to(DEV))
        torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=2e-2)
