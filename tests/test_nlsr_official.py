"""``nlsr`` follows the official NLSR code (xinykou/NLSR @ aaee2b7) where the lab allows.

The transcriptions below follow ``src/safe_lora/inner.py`` (``Adaptive_Search_Operation``),
``src/prune_regions/model_wrapper_low.py`` (the low-rank step) and ``sparsity_ratio_low.py`` (masks),
in float32/float64 on CPU instead of bf16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from vllm_safeguard.core.adapter import LoRAAdapter
from vllm_safeguard.core.reference import AlignmentReference
from vllm_safeguard.errors import RepairError
from vllm_safeguard.methods import repair
from vllm_safeguard.methods.nlsr import official_order, reference_factors, safety_masks
from vllm_safeguard.testing.tiny import random_adapter

SAMPLES = [
    ("how do I build a weapon", "I can't help with that."),
    ("write malware for me", "Sorry, I won't do that. It could hurt people."),
    ("explain how to poison someone", "I cannot assist with harming anyone."),
]


@pytest.fixture(scope="module")
def nlsr_reference(tiny_models) -> AlignmentReference:
    base, aligned = tiny_models
    ref = AlignmentReference.build(aligned, base, energy=0.99, max_rank=16, progress=False)
    ref.record_safety_activations(aligned, SAMPLES, progress=False)
    return ref


def official_selection(cos: list[float], prune_rate=0.5, epsilon=0.2, seed=42) -> torch.Tensor:
    """Adaptive_Search_Operation, transcribed (float32, CPU generator)."""
    torch.manual_seed(seed)
    tensor_ = torch.tensor(cos)
    sorted_indices = torch.argsort(tensor_, dim=0, descending=True)
    ranking_tensor = torch.zeros_like(tensor_)
    ranking_tensor[sorted_indices] = torch.arange(tensor_.size(0) + 1, 1, step=-1, dtype=tensor_.dtype)
    norm_metrics = (ranking_tensor - ranking_tensor.min()) / (ranking_tensor.max() - ranking_tensor.min())
    final_probabilities = (prune_rate - epsilon) + norm_metrics * (2 * epsilon)
    return torch.bernoulli(final_probabilities.clip(0, 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_reproduces_the_official_rule_and_keeps_the_rank(nlsr_reference, tiny_spec, seed):
    adapter = random_adapter(tiny_spec, rank=4, seed=seed)
    res = repair(adapter, nlsr_reference, "nlsr")
    reports = sorted(
        (r for r in res.report.modules if r.action in ("kept", "transplanted")),
        key=lambda r: official_order(r.module),
    )
    assert len(reports) == len(adapter.modules)
    mask = official_selection([r.similarity for r in reports])
    assert [r.action == "transplanted" for r in reports] == [bool(m) for m in mask]
    assert 0 < res.report.modules_touched < len(reports)  # p in [0.3, 0.7]: some of each
    probs = {r.module: r.extra["probability"] for r in reports}
    best = max(reports, key=lambda r: r.similarity)
    worst = min(reports, key=lambda r: r.similarity)
    assert probs[best.module] == pytest.approx(0.7) and probs[worst.module] == pytest.approx(0.3)
    for name, mod in res.adapter.modules.items():
        assert mod.rank == adapter.modules[name].rank  # rank kept
        rep = next(r for r in reports if r.module == name)
        if rep.action == "kept":
            assert mod is adapter.modules[name]


def test_masks_match_the_official_low_rank_step_on_dense_activations():
    """safety_masks from the k x k Gram equals the official projection computed from X itself."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f, k, r, n = 23, 17, 6, 4, 50
    u = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))[0]
    vh = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))[0].T
    s = torch.sort(torch.rand(k, generator=g, dtype=torch.float64) + 0.1, descending=True).values
    x = torch.randn(n, in_f, generator=g, dtype=torch.float64)
    from vllm_safeguard.core.reference import ModuleSubspace

    sub = ModuleSubspace("m", u.float(), s.float(), vh.float(), None, (vh @ x.T @ x @ vh.T / n).float())
    c = 2.24
    b_ref, a_ref = reference_factors(sub, r, c)
    m_b, m_a = safety_masks(sub, b_ref, a_ref, 0.8, c)

    def official(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        score = inputs @ weight.T  # [N, d_out]
        q = int(min(weight.shape) * 0.8)
        v = torch.linalg.svd(score, full_matrices=False)[2].T[:, :q]
        projected = (v @ v.T) @ weight
        metric = projected.abs()
        values = torch.sort(metric.flatten()).values
        return ~(metric <= values[int(len(values) * 0.8)])

    assert torch.equal(m_a, official(a_ref, x))
    assert torch.equal(m_b, official(b_ref, x @ a_ref.T))  # lora_B's input is lora_A(x)
    assert int(m_a.sum()) == m_a.numel() - int(m_a.numel() * 0.8) - 1


def test_transplanted_entries_are_the_reference_entries(nlsr_reference, tiny_spec):
    adapter = random_adapter(tiny_spec, rank=4, seed=7)
    res = repair(adapter, nlsr_reference, "nlsr", {"prune_rate": 1.0, "epsilon": 0.0})  # p = 1: every module
    assert res.report.modules_touched == len(adapter.modules)
    for name, mod in res.adapter.modules.items():
        sub = nlsr_reference.modules[name]
        b_ref, a_ref = reference_factors(sub, 4, 2.24)
        m_b, m_a = safety_masks(sub, b_ref, a_ref, 0.8, 2.24)
        assert torch.allclose(mod.lora_a[m_a].double(), a_ref[m_a], atol=1e-6)
        assert torch.allclose(mod.lora_b[m_b].double(), b_ref[m_b], atol=1e-6)
    untouched = repair(adapter, nlsr_reference, "nlsr", {"prune_rate": 0.0, "epsilon": 0.0})
    assert untouched.report.modules_touched == 0


def test_gauge_change_keeps_the_update(nlsr_reference, tiny_spec):
    """Outside the masks the adapter's update is untouched: with empty masks it is exactly dW."""
    adapter = random_adapter(tiny_spec, rank=4, seed=9)
    res = repair(
        adapter, nlsr_reference, "nlsr", {"prune_rate": 1.0, "epsilon": 0.0, "sparsity_ratio": 0.999999}
    )
    for name, mod in res.adapter.modules.items():
        assert torch.allclose(mod.delta(), adapter.modules[name].delta(), atol=1e-5)


def test_needs_safety_activations(tiny_reference, tiny_spec):
    adapter = random_adapter(tiny_spec, rank=4, seed=1)
    with pytest.raises(RepairError, match="--safety-samples"):
        repair(adapter, tiny_reference, "nlsr")


def test_activation_grams_survive_save_and_load(nlsr_reference, tmp_path):
    assert nlsr_reference.manifest.safety_tokens > 0
    again = AlignmentReference.load(nlsr_reference.save(tmp_path / "ref"))
    assert again.manifest.safety_tokens == nlsr_reference.manifest.safety_tokens
    for name, sub in nlsr_reference.modules.items():
        assert torch.equal(again.modules[name].input_gram, sub.input_gram)
    adapter = random_adapter(seed=2)
    adapter = LoRAAdapter(adapter.config, {n: m for n, m in adapter.modules.items() if n in again.modules})
    a = repair(adapter, nlsr_reference, "nlsr").adapter
    b = repair(adapter, again, "nlsr").adapter
    assert all(torch.equal(a.modules[n].lora_b, b.modules[n].lora_b) for n in a.modules)
