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


def test_gpu_fp32_uses_tf32_like_vllm() -> None:
    """fp32 weights: TF32 dots (tl.dot's default, as in vLLM's LoRA kernels), so ~1e-3 relative."""
    k, outs, r, r_s = SHAPES[3]
    la, lb, sa, sb = _weights(k, outs, r, r_s, 4, torch.float32)
    x, y0, mapping, alpha = _batch(64, k, sum(outs), 4, torch.float32)
    meta = make_safety_lora_meta(mapping, alpha, 4, DEV)
    got = y0.clone()
    fused_safety_lora(got, x, la, lb, sa, sb, meta.token_alpha[:64], *meta.meta_args(64))
    ref = y0.clone()
    fused_safety_lora_ref(ref, x, la, lb, sa, sb, alpha.to(DEV), mapping.to(DEV))
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=5e-3)


@torch.no_grad()
def test_gpu_compiled_op_replayed_in_a_cuda_graph_reads_new_alpha() -> None:
    """The registered op traced by torch.compile(fullgraph=True) and captured in a CUDA graph, as vLLM
    runs a layer: alpha refilled in place between replays, each replay matches the reference."""
    from kernels.triton_ops.fused_safety_lora import register_fused_safety_lora_op

    register_fused_safety_lora_op()
    dtype, m, max_loras = torch.bfloat16, 16, 4
    k, outs, r, r_s = SHAPES[0]
    la, lb, sa, sb = _weights(k, outs, r, r_s, max_loras, dtype)
    x, y0, mapping, _ = _batch(m, k, sum(outs), max_loras, dtype)
    meta = SafetyLoRAKernelMeta.make(max_loras, m, DEV)
    meta.prepare_tensors(mapping, torch.ones(m))
    meta.skip_flag_cpu[0] = False  # as the plugin's wrapper forces: never skip inside a graph
    args = meta.meta_args(m, specialize_active_groups=False)
    y = torch.empty_like(y0)

    def layer() -> None:
        y.copy_(y0)
        torch.ops.safeguard.fused_safety_lora(y, x, la, lb, sa, sb, meta.token_alpha[:m], *args, 1.0, True)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compiled()
    for value in (0.0, 0.5, 1.0, 2.0):
        alpha = torch.full((m,), value)
        meta.prepare_tensors(mapping, alpha)
        meta.skip_flag_cpu[0] = False
        graph.replay()
        ref = y0.clone()
        fused_safety_lora_ref(ref, x, la, lb, sa, sb, alpha.to(DEV), mapping.to(DEV))
        torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=2e-2)


@torch.no_grad()
def test_gpu_guard_score_op_in_a_cuda_graph() -> None:
    """The guard's op captured once; the pending requests change between replays (buffers in place)."""
    from kernels.torch_ops.guard_score import register_guard_score_op

    register_guard_score_op()
    n, hidden, cap = 8, 32, 4
    f32 = dict(dtype=torch.float32, device=DEV)
    weight = torch.zeros(hidden, **f32)
    weight[0] = 10.0
    bias, mean, std = torch.zeros(1, **f32), torch.zeros(hidden, **f32), torch.ones(hidden, **f32)
    decision = torch.tensor([0.5, 0.0, 1.0, 0.5], **f32)  # [thr, lo, hi, ramp_low = thr: two levels]
    index = torch.zeros(cap, dtype=torch.int64, device=DEV)
    valid = torch.zeros(cap, dtype=torch.bool, device=DEV)
    owner = torch.full((n,), -1, dtype=torch.int64, device=DEV)
    alpha = torch.full((n,), 0.5, **f32)
    scores = torch.zeros(cap, **f32)
    h = torch.zeros(n, hidden, dtype=torch.bfloat16, device=DEV)

    def step() -> None:
        torch.ops.safeguard.guard_score(
            h, None, index, valid, owner, weight, bias, mean, std, decision, alpha, scores
        )

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for last, sign, expect in ((2, 1.0, 1.0), (5, -1.0, 0.0)):
        h.zero_()
        h[last, 0] = sign
        alpha.fill_(0.5)
        index.copy_(torch.tensor([last, 0, 0, 0]))
        valid.copy_(torch.tensor([True, False, False, False]))
        owner.copy_(torch.tensor([0 if t <= last else -1 for t in range(n)]))
        graph.replay()
        torch.cuda.synchronize()
        assert alpha.tolist() == [expect] * (last + 1) + [0.5] * (n - last - 1)
        assert (scores[0].item() >= 0.5) == (sign > 0)
