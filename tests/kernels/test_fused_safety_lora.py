"""Fused task-LoRA + safety-delta kernels vs the torch reference (and vs a brute-force fp64 formula).

Without a GPU the kernels run in the Triton interpreter on CPU tensors (see conftest.py); with one,
the same cases run compiled on CUDA. The interpreter is slow, so the shapes are small and the
parametrizations are a covering set (odd / TP-divided hidden sizes, ranks 1..64, 1-3 slices with
GQA-sized qkv, tokens of several adapters and of none, alpha in {0, 0.5, 1, 2}) rather than a
cartesian product.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import (
    ExpandConfig,
    SafetyLoRAKernelMeta,
    ShrinkConfig,
    fused_safety_expand,
    fused_safety_expand_ref,
    fused_safety_lora,
    fused_safety_lora_ref,
    fused_safety_shrink,
    fused_safety_shrink_ref,
    make_safety_lora_meta,
    register_fused_safety_lora_op,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():  # pragma: no cover - misconfigured environment
    pytest.skip("TRITON_INTERPRET=0 but no CUDA device", allow_module_level=True)

ALPHAS = (0.0, 0.5, 1.0, 2.0)
# (atol, rtol) kernel vs reference; reference vs fp64 brute force.
TOL = {torch.float32: (2e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}
TOL_BRUTE = {torch.float32: (1e-3, 1e-3), torch.float16: (5e-2, 2e-2), torch.bfloat16: (2.5e-1, 5e-2)}


@dataclass
class Case:
    x: torch.Tensor
    y: torch.Tensor
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    safety_a: list[torch.Tensor]
    safety_b: list[torch.Tensor]
    mapping: torch.Tensor
    alpha: torch.Tensor
    max_loras: int

    def meta(self) -> SafetyLoRAKernelMeta:
        return make_safety_lora_meta(self.mapping, self.alpha, self.max_loras, DEVICE)

    def weights(self, *, task: bool = True, safety: bool = True) -> tuple[list[torch.Tensor] | None, ...]:
        """``(lora_a, lora_b, safety_a, safety_b)``, None for a part left out."""
        return (
            self.lora_a if task else None,
            self.lora_b if task else None,
            self.safety_a if safety else None,
            self.safety_b if safety else None,
        )


def make_case(
    k: int,
    outs: tuple[int, ...],
    r: int,
    r_s: int,
    m: int,
    dtype: torch.dtype = torch.float32,
    mapping: str = "mixed",
    max_loras: int = 3,
    alpha: float | None = None,
    seed: int = 0,
) -> Case:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    if mapping == "mixed":  # several adapters and no-adapter tokens, interleaved (not pre-sorted)
        ids = torch.randint(-1, max_loras, (m,), generator=g)
        ids[: min(m, max_loras + 1)] = torch.arange(-1, max_loras)[: min(m, max_loras + 1)]
        ids = ids[torch.randperm(m, generator=g)]
    elif mapping == "none":
        ids = torch.full((m,), -1)
    elif mapping == "single":
        ids = torch.full((m,), max_loras - 1)
    else:
        raise ValueError(mapping)
    if alpha is None:
        alphas = torch.tensor(ALPHAS)[torch.randint(0, len(ALPHAS), (m,), generator=g)]
        alphas[: min(m, 4)] = torch.tensor(ALPHAS)[: min(m, 4)]
    else:
        alphas = torch.full((m,), alpha)
    if m == 1:  # a single decode token: give it both an adapter and a safety strength
        ids, alphas = torch.zeros(1, dtype=torch.long), torch.ones(1)
    return Case(
        x=rnd(m, k),
        y=rnd(m, sum(outs)),
        lora_a=[rnd(max_loras, r, k, scale=k**-0.5) for _ in outs],
        lora_b=[rnd(max_loras, n, r, scale=r**-0.5) for n in outs],
        safety_a=[rnd(r_s, k, scale=k**-0.5) for _ in outs],
        safety_b=[rnd(n, r_s, scale=r_s**-0.5) for n in outs],
        mapping=ids.to(torch.int32),
        alpha=alphas.float(),
        max_loras=max_loras,
    )


def run_kernel(c: Case, *, safety: bool = True, task: bool = True, **kw) -> torch.Tensor:
    meta = c.meta()
    y = c.y.clone()
    m = c.x.size(0)
    fused_safety_lora(
        y, c.x, *c.weights(task=task, safety=safety), meta.token_alpha[:m], *meta.meta_args(m), **kw
    )
    return y


def run_ref(c: Case, *, safety: bool = True, task: bool = True, **kw) -> torch.Tensor:
    y = c.y.clone()
    fused_safety_lora_ref(
        y, c.x, *c.weights(task=task, safety=safety), c.alpha.to(DEVICE), c.mapping.to(DEVICE), **kw
    )
    return y


def brute_force(c: Case, scaling: float = 1.0) -> torch.Tensor:
    """The issue's formula token by token in fp64: y + s (x A_t) B_t + alpha (x A_s) B_s."""
    y = c.y.double().cpu()
    x = c.x.double().cpu()
    off = 0
    for s, b in enumerate(c.lora_b):
        n = b.size(1)
        for t in range(x.size(0)):
            i, a = int(c.mapping[t]), float(c.alpha[t])
            d = torch.zeros(n, dtype=torch.float64)
            if i >= 0:
                d += scaling * (x[t] @ c.lora_a[s][i].double().cpu().T) @ b[i].double().cpu().T
            d += a * (x[t] @ c.safety_a[s].double().cpu().T) @ c.safety_b[s].double().cpu().T
            y[t, off : off + n] += d
        off += n
    return y


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol[0], rtol=tol[1])


# id: (hidden_in K, output slices, task rank, safety rank, tokens, dtype)
SHAPES = {
    "odd_hidden_1slice": (97, (97,), 8, 8, 13, torch.float32),
    "tp2_qkv_gqa": (288, (288, 96, 96), 16, 16, 9, torch.float32),  # SmolLM2 q/k/v over TP=2
    "tp4_gate_up": (144, (384, 384), 8, 4, 7, torch.float32),  # 576/4 in, 1536/4 out
    "tp2_down": (384, (96,), 16, 16, 5, torch.float32),
    "rank1": (33, (50,), 1, 1, 6, torch.float32),
    "rank64": (64, (64, 32), 64, 64, 5, torch.float32),
    "odd_ranks_qkv": (100, (37, 11, 11), 33, 20, 11, torch.float32),
    "safety_rank_gt_task": (64, (48,), 4, 32, 7, torch.float32),
    "decode_one_token": (97, (64, 16, 16), 16, 16, 1, torch.float32),
    "fp16_qkv": (128, (64, 16, 16), 16, 8, 12, torch.float16),
    "fp16_odd": (97, (45,), 3, 5, 8, torch.float16),
    "bf16_gate_up": (96, (80, 80), 8, 8, 6, torch.bfloat16),  # interpreter: dots upcast to fp32
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference_and_formula(name: str) -> None:
    k, outs, r, r_s, m, dtype = SHAPES[name]
    c = make_case(k, outs, r, r_s, m, dtype, seed=len(name))
    got = run_kernel(c, scaling=0.5)
    ref = run_ref(c, scaling=0.5)
    assert_close(got, ref, TOL[dtype])
    assert_close(ref, brute_force(c, scaling=0.5), TOL_BRUTE[dtype])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 300),
    outs=st.lists(st.integers(1, 200), min_size=1, max_size=3),
    r=st.integers(1, 64),
    r_s=st.integers(1, 64),
    m=st.integers(1, 40),
    max_loras=st.integers(1, 4),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(
    k: int, outs: list[int], r: int, r_s: int, m: int, max_loras: int, half: bool, seed: int
) -> None:
    dtype = torch.float16 if half else torch.float32
    c = make_case(k, tuple(outs), r, r_s, m, dtype, max_loras=max_loras, seed=seed)
    assert_close(run_kernel(c), run_ref(c), TOL[dtype])


@pytest.mark.parametrize("mapping", ["none", "single"])
@pytest.mark.parametrize("name", ["tp2_qkv_gqa", "fp16_odd"])
def test_mapping_patterns(name: str, mapping: str) -> None:
    k, outs, r, r_s, m, dtype = SHAPES[name]
    c = make_case(k, outs, r, r_s, m, dtype, mapping=mapping, seed=3)
    assert_close(run_kernel(c), run_ref(c), TOL[dtype])
    assert_close(run_ref(c), brute_force(c), TOL_BRUTE[dtype])


@pytest.mark.parametrize("alpha", ALPHAS)
def test_uniform_alpha(alpha: float) -> None:
    c = make_case(97, (48, 16, 16), 8, 8, 10, alpha=alpha, seed=7)
    got = run_kernel(c)
    assert_close(got, run_ref(c), TOL[torch.float32])
    assert_close(got, brute_force(c), TOL_BRUTE[torch.float32])
    if alpha == 0.0:
        torch.testing.assert_close(got, run_kernel(c, safety=False), atol=0, rtol=0)


def test_shrink_buffer_layout() -> None:
    """buffer[s, t] = [scaling * x A_i^T (0 if no adapter) | alpha_t * x A_s^T]."""
    c = make_case(100, (37, 11, 11), 33, 20, 11, seed=1)
    meta = c.meta()
    m = c.x.size(0)
    got = torch.full((3, m, 53), float("nan"), device=DEVICE)
    fused_safety_shrink(c.x, c.lora_a, c.safety_a, meta.token_alpha[:m], got, *meta.meta_args(m), scaling=2.0)
    ref = torch.empty_like(got)
    fused_safety_shrink_ref(
        c.x, c.lora_a, c.safety_a, c.alpha.to(DEVICE), ref, c.mapping.to(DEVICE), scaling=2.0
    )
    assert_close(got, ref, TOL[torch.float32])
    no_adapter = (c.mapping == -1).to(DEVICE)
    assert bool((got[:, no_adapter, :33] == 0).all()), "task columns of no-adapter tokens must be 0"
    assert bool((got[:, (c.alpha == 0).to(DEVICE), 33:] == 0).all())


@pytest.mark.parametrize("split_k", [1, 3])
def test_small_tiles_multi_block(split_k: int) -> None:
    """Explicit small tiles: several M blocks per adapter, several rank (N / K) blocks, split-K."""
    c = make_case(100, (70, 23, 23), 33, 20, 40, mapping="single", seed=5)
    c.mapping[::5] = -1
    c.mapping[1::7] = 0
    shrink = ShrinkConfig(block_m=16, block_n=16, block_k=32, split_k=split_k)
    expand = ExpandConfig(block_m=16, block_n=16, block_k_task=16, block_k_safety=16)
    got = run_kernel(c, shrink_config=shrink, expand_config=expand)
    assert_close(got, run_ref(c), TOL[torch.float32])


@pytest.mark.parametrize("which", ["task_only", "safety_only"])
def test_single_component(which: str) -> None:
    """safety_a/b=None is a plain punica LoRA pass; lora_a/b=None a safety-only pass (unfused baseline)."""
    c = make_case(97, (64, 16, 16), 16, 8, 9, seed=11)
    kw = {"safety": False} if which == "task_only" else {"task": False}
    assert_close(run_kernel(c, **kw), run_ref(c, **kw), TOL[torch.float32])
    # task pass + safety pass == fused pass
    both = c.y.clone()
    for kw2 in ({"safety": False}, {"task": False}):
        meta = c.meta()
        fused_safety_lora(both, c.x, *c.weights(**kw2), meta.token_alpha[:9], *meta.meta_args(9))
    assert_close(both, run_kernel(c), TOL[torch.float32])


def test_offset_start_and_overwrite() -> None:
    c = make_case(64, (32, 16), 8, 8, 6, seed=2)
    meta = c.meta()
    buf = torch.empty(2, 6, 16, device=DEVICE)
    fused_safety_shrink(c.x, c.lora_a, c.safety_a, meta.token_alpha[:6], buf, *meta.meta_args(6))
    for add in (True, False):
        wide = torch.randn(6, 60, device=DEVICE)
        got, ref = wide.clone(), wide.clone()
        fused_safety_expand(buf, c.lora_b, c.safety_b, meta.token_alpha[:6], got, *meta.meta_args(6), 7, add)
        fused_safety_expand_ref(
            buf,
            c.lora_b,
            c.safety_b,
            c.alpha.to(DEVICE),
            ref,
            c.mapping.to(DEVICE),
            offset_start=7,
            add_inputs=add,
        )
        assert_close(got, ref, TOL[torch.float32])
        torch.testing.assert_close(got[:, :7], wide[:, :7], atol=0, rtol=0)
        torch.testing.assert_close(got[:, 55:], wide[:, 55:], atol=0, rtol=0)


def test_vllm_4d_weights_and_unspecialized_grid() -> None:
    """vLLM stacks lora weights as [max_loras, 1, *, *]; and a fixed max_loras+1 grid (CUDA graphs)."""
    c = make_case(97, (48, 16, 16), 8, 8, 9, seed=4)
    expected = run_kernel(c)
    meta = c.meta()
    y = c.y.clone()
    fused_safety_lora(
        y,
        c.x,
        [w.unsqueeze(1) for w in c.lora_a],
        [w.unsqueeze(1) for w in c.lora_b],
        c.safety_a,
        c.safety_b,
        meta.token_alpha[:9],
        *meta.meta_args(9, specialize_active_groups=False),
    )
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Early exit and exactness of alpha == 0
# ------------------------------------------------------------------------------------------------


def test_early_exit_no_lora_alpha_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """No adapter anywhere and alpha 0 everywhere: no kernel launch at all, output untouched."""

    class _NoLaunch:
        def __getitem__(self, grid: object) -> object:
            raise AssertionError("kernel launched although there is nothing to do")

    for kernel in ("shrink", "expand"):
        mod = importlib.import_module(f"kernels.triton_ops.fused_safety_lora_{kernel}")
        monkeypatch.setattr(mod, f"_fused_{kernel}_kernel", _NoLaunch())
    c = make_case(64, (32, 16), 8, 8, 5, mapping="none", alpha=0.0)
    meta = c.meta()
    assert bool(meta.skip_flag_cpu.item())
    y = c.y.clone()
    fused_safety_lora(
        y, c.x, c.lora_a, c.lora_b, c.safety_a, c.safety_b, meta.token_alpha[:5], *meta.meta_args(5)
    )
    assert torch.equal(y, c.y)
    y_ref = c.y.clone()
    fused_safety_lora_ref(y_ref, c.x, c.lora_a, c.lora_b, c.safety_a, c.safety_b, c.alpha, c.mapping)
    assert torch.equal(y_ref, c.y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_alpha_zero_is_bit_identical(dtype: torch.dtype) -> None:
    """Mixed batch: alpha-0 tokens without an adapter are not written (even -0.0 and NaN survive);
    alpha-0 tokens with an adapter get exactly the no-safety result."""
    c = make_case(97, (48, 16, 16), 8, 8, 12, dtype=dtype, seed=9)
    c.mapping = torch.tensor([-1, 0, 2, -1, 1, 0, -1, 2, 2, -1, 0, 1], dtype=torch.int32)
    c.alpha = torch.tensor([0, 0, 1, 0.5, 0, 2, 0, 0, 0.5, 1, 0, 2], dtype=torch.float32)
    untouched = (c.mapping == -1) & (c.alpha == 0)
    task_only = (c.mapping >= 0) & (c.alpha == 0)
    assert bool(untouched.any()) and bool(task_only.any()) and bool((c.alpha != 0).any())
    rows = untouched.nonzero().squeeze(1)
    c.y[rows[0], :5] = -0.0
    c.y[rows[0], 5] = float("nan")
    for run in (run_kernel, run_ref):
        fused = run(c)
        plain = run(c, safety=False)
        u, t = untouched.to(DEVICE), task_only.to(DEVICE)
        assert torch.equal(bits(fused[u]), bits(c.y[u])), f"{run.__name__}: wrote rows with nothing to add"
        assert torch.equal(fused[t], plain[t]), f"{run.__name__}: alpha 0 changed task-adapter tokens"


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------


def test_meta_layout() -> None:
    mapping = torch.tensor([2, -1, 0, 2, -1, 1, 2], dtype=torch.int32)
    alpha = torch.tensor([0, 1, 0, 0, 0, 0, 0], dtype=torch.float32)
    meta = make_safety_lora_meta(mapping, alpha, max_loras=4, device="cpu")
    _, order, counts, starts, ids, skip, groups = meta.meta_args(7)
    assert ids.tolist() == [-1, 0, 1, 2, -1]
    assert counts.tolist() == [2, 1, 1, 3, 0]
    assert starts.tolist() == [0, 2, 3, 4, 7, 0]
    assert order.tolist() == [1, 4, 2, 5, 0, 3, 6]
    assert not bool(skip.item()) and int(groups.item()) == 4
    assert int(meta.meta_args(7, specialize_active_groups=False)[-1].item()) == 5
    # all tokens without adapter but one alpha != 0: still work to do, indices still filled
    meta.prepare_tensors(torch.full((3,), -1, dtype=torch.int32), torch.tensor([0.0, 0.5, 0.0]))
    assert not bool(meta.skip_flag_cpu.item())
    assert meta.num_tokens_per_lora[:1].tolist() == [3]
    with pytest.raises(ValueError, match="token_alpha"):
        meta.prepare_tensors(mapping, alpha[:3])
    with pytest.raises(ValueError, match="must lie in"):
        meta.prepare_tensors(torch.tensor([4], dtype=torch.int32), torch.zeros(1))


def test_meta_matches_vllm() -> None:
    """Same sorted layout as vLLM's own LoRAKernelMeta whenever some token has an adapter."""
    kernel_meta = pytest.importorskip("vllm.lora.ops.triton_ops.lora_kernel_metadata")
    mapping = torch.tensor([1, -1, 0, 1, 3, -1, 0, 0], dtype=torch.int32)
    vm = kernel_meta.LoRAKernelMeta.make(max_loras=4, max_num_tokens=16, device="cpu")
    vm.prepare_tensors(mapping)
    ours = make_safety_lora_meta(mapping, torch.zeros(8), max_loras=4, device="cpu")
    for a, b in zip(vm.meta_args(8, True)[:5], ours.meta_args(8)[:5], strict=True):
        assert torch.equal(a, b)


def test_task_part_matches_vllm_torch_ops() -> None:
    """The reference's task-only path has vLLM's punica semantics (bgmv shrink + expand_slice)."""
    torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
    c = make_case(97, (48, 16, 16), 8, 8, 9, mapping="single")
    idx = c.mapping.long()
    expected = c.y.clone().cpu()
    off = 0
    for s, n in enumerate((48, 16, 16)):
        buf = torch.zeros(9, 8)
        torch_ops.bgmv_shrink(c.x.cpu(), c.lora_a[s].cpu(), buf, idx, 0.5)
        torch_ops.bgmv_expand_slice(buf, c.lora_b[s].cpu(), expected, idx, off, n, True)
        off += n
    assert_close(run_ref(c, safety=False, scaling=0.5), expected, TOL[torch.float32])


# ------------------------------------------------------------------------------------------------
# Custom op and package boundaries
# ------------------------------------------------------------------------------------------------


def test_custom_op_schema_and_call() -> None:
    """``torch.ops.safeguard.fused_safety_lora``: the schema the GPU punica wrapper calls positionally,
    and bit for bit what ``fused_safety_lora`` computes."""
    register_fused_safety_lora_op()
    register_fused_safety_lora_op()  # idempotent
    op = torch.ops.safeguard.fused_safety_lora
    assert str(op.default._schema) == (
        "safeguard::fused_safety_lora(Tensor(a0!) y, Tensor x, Tensor[] lora_a_stacked, "
        "Tensor[] lora_b_stacked, Tensor[] safety_a, Tensor[] safety_b, Tensor token_alpha, "
        "Tensor token_lora_mapping, Tensor token_indices_sorted_by_lora_ids, Tensor num_tokens_per_lora, "
        "Tensor lora_token_start_loc, Tensor lora_ids, Tensor skip_flag_cpu, Tensor num_active_groups, "
        "float scaling, bool add_inputs) -> ()"
    )
    c = make_case(97, (48, 16, 16), 8, 8, 9, seed=4)
    meta = c.meta()
    for add in (True, False):
        y = c.y.clone()
        op(y, c.x, *c.weights(), meta.token_alpha, *meta.meta_args(9, False), 0.5, add)
        torch.testing.assert_close(y, run_kernel(c, scaling=0.5, add_inputs=add), atol=0, rtol=0)


@torch.no_grad()
def test_custom_op_under_torch_compile_reads_alpha_changed_in_place() -> None:
    """The op traced by ``torch.compile(fullgraph=True)`` (as vLLM compiles a model) and called again
    with alphas refilled in place: same outputs as the eager op for alpha 0 / 0.5 / 1 / 2, one trace."""
    register_fused_safety_lora_op()
    c = make_case(64, (32, 16), 8, 4, 6, seed=5)
    meta = c.meta()
    args = meta.meta_args(6, False)
    traces = []

    def backend(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        traces.append(gm)
        return gm.forward

    def layer(y: torch.Tensor) -> torch.Tensor:
        torch.ops.safeguard.fused_safety_lora(y, c.x, *c.weights(), meta.token_alpha, *args, 1.0, True)
        return y

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    outs = []
    for value in (0.0, 0.5, 1.0, 2.0):
        meta.prepare_tensors(c.mapping, torch.full((6,), value))
        meta.skip_flag_cpu[0] = False
        got = compiled(c.y.clone())
        torch.testing.assert_close(got, layer(c.y.clone()), atol=0, rtol=0)
        outs.append(got)
    assert len(traces) == 1
    assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[2], outs[3])


def test_kernels_stand_alone() -> None:
    """Nothing under kernels/ imports vLLM or vllm_safeguard, and the torch references import (and
    run) where triton is missing; the Triton names then fail with ImportError, not silently."""
    root = Path(__file__).resolve().parents[2]
    for path in (root / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] in ("vllm", "vllm_safeguard")], path
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "y = torch.zeros(2, 3)\n"
        "kernels.fused_safety_lora_ref(y, torch.ones(2, 4), None, None, [torch.ones(1, 4)],"
        " [torch.ones(3, 1)], torch.tensor([0.0, 1.0]), torch.tensor([-1, -1]))\n"
        "assert y.tolist() == [[0.0] * 3, [4.0] * 3], y\n"
        "try:\n    kernels.fused_safety_lora\nexcept ImportError:\n    pass\n"
        "else:\n    raise AssertionError('triton names must need triton')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, timeout=300)


# ------------------------------------------------------------------------------------------------
# Coverage check (a serving check, not kernel maths: vllm_safeguard.integration.layer_table)
# ------------------------------------------------------------------------------------------------


def test_coverage_check() -> None:
    from vllm_safeguard.integration.layer_table import (
        SafetyCoverageError,
        SafetyDeltaSpec,
        check_safety_coverage,
    )

    expected = [f"model.layers.{i}.self_attn.qkv_proj" for i in range(3)] + ["model.layers.0.mlp.down_proj"]
    assert check_safety_coverage(expected, [*expected, "extra"]) == sorted(expected)
    with pytest.raises(SafetyCoverageError, match=r"covers 3 of 4 .*down_proj"):
        check_safety_coverage(expected, expected[:3])
    with pytest.raises(SafetyCoverageError, match="missing 4"):
        check_safety_coverage(expected, [])
    with pytest.raises(SafetyCoverageError, match="wrong number of slices"):
        check_safety_coverage({"qkv": 3}, {"qkv": 1})
    spec = SafetyDeltaSpec(rank=16, modules={"qkv": 3, "o": 1})
    assert spec.check_covers({"qkv": 3}) == ["qkv"]
    with pytest.raises(SafetyCoverageError, match="missing 1: gate_up"):
        spec.check_covers(["qkv", "o", "gate_up"])
    with pytest.raises(SafetyCoverageError, match="no modules"):
        SafetyDeltaSpec(rank=16, modules={})
    with pytest.raises(TypeError):
        check_safety_coverage("qkv", ["qkv"])
