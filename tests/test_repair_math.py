"""Property tests for the repair maths: low-rank computations against dense ones, and invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_safeguard.core.adapter import LoRAAdapter, LoRAModule
from vllm_safeguard.core.lowrank import refactorize
from vllm_safeguard.core.reference import AlignmentReference, ModuleSubspace, ReferenceManifest
from vllm_safeguard.core.risk import score_adapter
from vllm_safeguard.errors import ConfigError, RepairError
from vllm_safeguard.methods import repair
from vllm_safeguard.methods.nlsr_datafree import safety_neurons
from vllm_safeguard.methods.safegene import SafetyAdapter, SafetyManifest

NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
settings.register_profile("repair", max_examples=40, deadline=None)
settings.load_profile("repair")


@st.composite
def problems(draw):
    """A random reference (orthonormal U, Vh) and a random adapter over two modules."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    out_f = draw(st.integers(3, 24))
    in_f = draw(st.integers(3, 24))
    k = draw(st.integers(1, min(out_f, in_f)))
    r = draw(st.integers(1, 6))
    subs, mods = {}, {}
    for name in NAMES:
        u = torch.linalg.qr(torch.randn(out_f, k, generator=g))[0]
        vh = torch.linalg.qr(torch.randn(in_f, k, generator=g))[0].T
        s = torch.rand(k, generator=g) + 0.1
        subs[name] = ModuleSubspace(name, u, s.sort(descending=True).values, vh.contiguous())
        mods[name] = LoRAModule(
            name,
            torch.randn(r, in_f, generator=g),
            torch.randn(out_f, r, generator=g),
            draw(st.sampled_from([0.5, 1.0, 2.0])),
        )
    manifest = ReferenceManifest(
        aligned_model="a", base_model="b", model_fingerprint="x", energy_target=1.0, max_rank=k, modules={}
    )
    return AlignmentReference(subs, manifest), LoRAAdapter({"r": r, "lora_alpha": r}, mods)


def _dense_cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


@given(problems())
def test_safelora_similarity_matches_dense(problem):
    ref, ad = problem
    res = repair(ad, ref, "safelora_subspace", {"threshold": 0.0})
    for rep in res.report.modules:
        u = ref.modules[rep.module].u
        dw = ad.modules[rep.module].delta()
        assert rep.similarity == pytest.approx(_dense_cos(u @ u.T @ dw, dw), abs=1e-4)


@given(problems())
def test_safelora_projection_idempotent_and_inside_subspace(problem):
    ref, ad = problem
    once = repair(ad, ref, "safelora_subspace", {"threshold": 1.0}).adapter
    twice = repair(once, ref, "safelora_subspace", {"threshold": 1.0}).adapter
    for name, mod in once.modules.items():
        u = ref.modules[name].u
        dw = mod.delta()
        assert torch.allclose(twice.modules[name].delta(), dw, atol=1e-4)
        assert torch.allclose(u @ (u.T @ dw), dw, atol=1e-4)  # lies in span(U)


@given(problems())
def test_adapter_inside_subspace_is_untouched(problem):
    ref, ad = problem
    inside = {}
    for name, mod in ad.modules.items():
        u = ref.modules[name].u
        inside[name] = LoRAModule(name, mod.lora_a, u @ (u.T @ mod.lora_b), mod.scaling)
    ad_in = ad.replace_modules(inside)
    res = repair(ad_in, ref, "safelora_subspace", {"threshold": 0.99})
    assert res.report.modules_touched == 0
    for name in inside:
        assert res.adapter.modules[name] is inside[name]


@given(problems())
def test_risk_matches_dense(problem):
    ref, ad = problem
    report = score_adapter(ad, ref)
    worst = undone_total = 0.0
    for name, mod in ad.modules.items():
        sub = ref.modules[name]
        coords = torch.diagonal(sub.u.T @ mod.delta() @ sub.vh.T)
        undone = float((sub.s * (-coords).clamp(min=0)).sum())  # unclamped: over-cancelling counts
        worst = max(worst, undone / float((sub.s**2).sum()))
        undone_total += undone
    total_mass = sum(float((sub.s**2).sum()) for sub in ref.modules.values())
    assert report.score == pytest.approx(worst, rel=1e-4, abs=1e-5)  # the worst module
    assert report.pooled == pytest.approx(undone_total / total_mass, rel=1e-4, abs=1e-5)
    assert 0.0 <= report.pooled <= report.score + 1e-6


@given(problems(), st.floats(1.0, 5.0), st.integers(1, 6))
def test_risk_cannot_be_diluted_or_saturated(problem, push, n_zero):
    """Adding zero or harmless modules never lowers the score; pushing harder never lowers it."""
    ref, ad = problem
    base = score_adapter(ad, ref).score
    name, mod = next(iter(ad.modules.items()))
    zeros = {
        f"{name}.zero{i}": LoRAModule(f"{name}.zero{i}", mod.lora_a * 0, mod.lora_b * 0)
        for i in range(n_zero)
    }
    diluted = ad.replace_modules({**ad.modules, **zeros})
    ref_zero = ref.modules[name]
    ref.modules.update({k: ref_zero for k in zeros})
    try:
        assert score_adapter(diluted, ref).score == pytest.approx(base, rel=1e-6, abs=1e-9)
    finally:
        for k in zeros:
            del ref.modules[k]
    harder = ad.replace_modules(
        {n: LoRAModule(n, m.lora_a, m.lora_b * push, m.scaling) for n, m in ad.modules.items()}
    )
    assert score_adapter(harder, ref).score >= base * push * (1 - 1e-4) - 1e-6


@given(problems(), st.floats(0.0, 2.0), st.floats(0.05, 1.0))
def test_nlsr_matches_dense_construction(problem, beta, frac):
    ref, ad = problem
    res = repair(
        ad,
        ref,
        "nlsr_datafree",
        {"beta": beta, "neuron_fraction": frac, "mode": "topk", "top_k_layers": 99, "default_max_rank": 64},
    )
    for name, mod in ad.modules.items():
        sub = ref.modules[name]
        rows = safety_neurons(sub, frac)
        v = sub.dense()
        expected = mod.delta().clone()
        expected[rows] = beta * v[rows]
        assert torch.allclose(res.adapter.modules[name].delta(), expected, atol=1e-4)
        # layer similarity (one module per layer here) equals the dense magnitude-aware cosine
        p, r_ = (v + mod.delta())[rows], v[rows]
        dense = float((p * r_).sum() / (r_.norm() * max(p.norm(), r_.norm())))
        rep = next(x for x in res.report.modules if x.module == name)
        assert rep.extra["layer_similarity"] == pytest.approx(dense, abs=1e-4)


@given(problems(), st.integers(1, 4))
def test_rank_bounds_hold(problem, bound):
    ref, ad = problem
    options = {
        "nlsr_datafree": {"mode": "topk", "top_k_layers": 99},
        "safelora": {"select_layers_type": "threshold", "threshold": 1.0},
        "safelora_subspace": {"threshold": 1.0},
    }
    for method, opts in options.items():
        res = repair(
            ad,
            ref,
            method,
            opts,
            max_rank=bound,
        )
        assert all(m.rank <= bound for m in res.adapter.modules.values())
        assert res.report.max_rank_out <= bound


@given(st.integers(2, 30), st.integers(2, 30), st.integers(1, 8), st.integers(1, 10), st.integers(0, 10**6))
def test_refactorize_exact_and_optimal(out_f, in_f, r, bound, seed):
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(out_f, r, generator=g), torch.randn(r, in_f, generator=g)
    b2, a2, kept = refactorize(b, a, bound)
    assert b2.shape[1] <= min(bound, r, out_f, in_f)
    dense = b @ a
    s = torch.linalg.svdvals(dense)
    k = b2.shape[1]
    # Eckart-Young: the truncation error equals the tail singular values
    err = float((dense - b2 @ a2).norm() ** 2)
    assert err == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-3, abs=1e-4)
    assert kept == pytest.approx(float((s[:k] ** 2).sum() / (s**2).sum()), rel=1e-4)


@given(problems(), st.floats(0.0, 3.0))
def test_safegene_adds_scaled_safety_delta(problem, coef):
    ref, ad = problem
    g = torch.Generator().manual_seed(0)
    safety_mods = {
        n: LoRAModule(
            n, torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g), 1.0
        )
        for n, m in ad.modules.items()
    }
    safety = SafetyAdapter(LoRAAdapter({"r": 2}, safety_mods), SafetyManifest(rank=2, layers=[0, 1]))
    res = repair(
        ad,
        ref,
        "safegene",
        {"coefficients": {0: coef}, "default_max_rank": 64},
        artifacts={"safety_adapter": safety},
    )
    for name, mod in ad.modules.items():
        c = coef if name.startswith("model.layers.0.") else 1.0
        expected = mod.delta() + c * safety_mods[name].delta()
        assert torch.allclose(res.adapter.modules[name].delta(), expected, atol=1e-4)


def test_zero_modules_matched_is_an_error(tiny_reference):
    mod = LoRAModule("model.layers.9.mlp.nonexistent", torch.ones(1, 4), torch.ones(4, 1))
    ad = LoRAAdapter({"r": 1}, {mod.name: mod})
    with pytest.raises(RepairError, match="none of the adapter's 1 modules"):
        repair(ad, tiny_reference, "safelora")


def test_bad_options_quote_the_value(tiny_reference):
    mod = next(iter(tiny_reference.modules.values()))
    ad = LoRAAdapter(
        {"r": 1},
        {mod.name: LoRAModule(mod.name, torch.ones(1, mod.vh.shape[1]), torch.ones(mod.u.shape[0], 1))},
    )
    with pytest.raises(ConfigError, match=r"1\.7"):
        repair(ad, tiny_reference, "safelora", {"threshold": 1.7})
    with pytest.raises(ConfigError, match="unknown repair method 'nope'"):
        repair(ad, tiny_reference, "nope")
    with pytest.raises(RepairError, match="safety adapter"):
        repair(ad, tiny_reference, "safegene")
