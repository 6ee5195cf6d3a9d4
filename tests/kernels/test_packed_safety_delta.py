"""The CPU serving path's packed safety delta vs the fused kernel's torch reference (safety only).

Odd shapes (1-3 slices of unequal widths, ranks 1-17, hidden sizes not a power of two), fp32 / bf16 /
fp16, alpha all-nonzero (no gather), mixed with zeros (gather) and all zero; rows with alpha 0 must
stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.torch_ops import fused_safety_lora_ref, pack_safety, packed_safety_delta

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _case(seed: int, tokens: int, hidden: int, widths: tuple[int, ...], rank: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    a = [(torch.randn(rank, hidden, generator=g) * 0.2).to(dtype) for _ in widths]
    b = [(torch.randn(n, rank, generator=g) * 0.2).to(dtype) for n in widths]
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    y = torch.randn(tokens, sum(widths), generator=g).to(dtype)
    return a, b, x, y


def _reference(y, x, a, b, alpha):
    out = y.clone()
    no_task = torch.full((x.shape[0],), -1, dtype=torch.long)
    fused_safety_lora_ref(out, x, None, None, a, b, alpha, no_task, add_inputs=True)
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tokens=st.integers(1, 13),
    hidden=st.sampled_from([7, 24, 33]),
    widths=st.sampled_from([(5,), (24, 8, 8), (17, 3)]),
    rank=st.sampled_from([1, 4, 17]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    alpha_kind=st.sampled_from(["ones", "mixed", "zeros", "scaled"]),
)
def test_packed_safety_delta_matches_the_reference(
    seed, tokens, hidden, widths, rank, dtype, alpha_kind
) -> None:
    a, b, x, y = _case(seed, tokens, hidden, widths, rank, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    alpha = {
        "ones": torch.ones(tokens),
        "zeros": torch.zeros(tokens),
        "scaled": torch.rand(tokens, generator=g) * 2 + 0.1,
        "mixed": torch.where(torch.rand(tokens, generator=g) < 0.5, 0.0, 1.5),
    }[alpha_kind]
    padded = torch.cat([alpha, torch.full((5,), 9.0)])  # the buffer is longer than the step: tail ignored
    expected = _reference(y, x, a, b, alpha)
    got = y.clone()
    packed_safety_delta(got, x, pack_safety(a, b), padded)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    untouched = alpha == 0
    assert torch.equal(got[untouched], y[untouched])  # alpha 0: never written


def test_packed_layout_and_shapes_are_checked() -> None:
    a, b, x, _ = _case(0, 3, 6, (4, 2), 2, torch.float32)
    p = pack_safety(a, b)
    assert p.a_t.shape == (6, 4) and [t.shape for t in p.b_t] == [(2, 4), (2, 2)]
    assert p.columns == ((0, 4), (4, 2)) and p.out_features == 6
    assert torch.equal(p.a_t[:, 2:], a[1].t()) and torch.equal(p.b_t[1], b[1].t())
    with pytest.raises(ValueError, match="do not fit"):
        packed_safety_delta(torch.zeros(3, 5), x, p, torch.ones(3))
    with pytest.raises(ValueError, match="slice 1"):
        pack_safety([a[0], a[1][:1]], b)
    with pytest.raises(ValueError, match="one A and one B"):
        pack_safety(a, b[:1])
