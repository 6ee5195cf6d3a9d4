"""``safelora`` is the paper's operator: checked against a dense transcription of the official code.

``official_projected_weighted`` below transcribes IBM/SafeLoRA ``model.py`` (``get_aligned_matrix`` +
``projected_weighted`` + the selection in ``SafeLoRA.__init__``) on dense tensors: ``C = V V^T /
torch.norm(V)``, ``cos = numpy.round(cosine(C B A, B A), 5)``, ``cos <= thr`` projects ``B <- C B``.
"""

from __future__ import annotations

import numpy
import pytest
import torch

from vllm_safeguard.core.adapter import LoRAAdapter, LoRAModule
from vllm_safeguard.core.model_files import read_weights
from vllm_safeguard.core.reference import AlignmentReference, ModuleSubspace, ReferenceManifest
from vllm_safeguard.methods import repair
from vllm_safeguard.testing.tiny import random_adapter


def official_projected_weighted(
    deltas: dict[str, torch.Tensor], adapter: LoRAAdapter, mode: str, threshold: float, num: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The official selection and projection, dense, in float64. Returns (new B per module, cos)."""
    c = {n: (v @ v.T) / torch.norm(v) for n, v in deltas.items()}
    cos = {}
    for name, mod in adapter.modules.items():
        fw = (c[name] @ mod.lora_b.double()) @ mod.lora_a.double()
        ori = mod.lora_b.double() @ mod.lora_a.double()
        cos[name] = numpy.round(
            torch.nn.functional.cosine_similarity(fw.reshape(1, -1), ori.reshape(1, -1)).item(), 5
        )
    thr = threshold if mode == "threshold" else numpy.sort(list(cos.values()))[:num][-1]
    new_b = {
        n: (c[n] @ m.lora_b.double() if cos[n] <= thr else m.lora_b.double())
        for n, m in adapter.modules.items()
    }
    return new_b, cos


def _exact_reference(deltas: dict[str, torch.Tensor]) -> AlignmentReference:
    subs = {}
    for name, v in deltas.items():
        u, s, vh = torch.linalg.svd(v.float(), full_matrices=False)
        subs[name] = ModuleSubspace(name, u, s, vh, float((v**2).sum()))
    manifest = ReferenceManifest(
        aligned_model="a",
        base_model="b",
        model_fingerprint="x",
        energy_target=1.0,
        max_rank=10**6,
        modules={},
    )
    return AlignmentReference(subs, manifest)


def _check(deltas, adapter, ref, options, mode, threshold, num) -> int:
    res = repair(adapter, ref, "safelora", options)
    new_b, cos = official_projected_weighted(deltas, adapter, mode, threshold, num)
    by_name = {r.module: r for r in res.report.modules}
    for name, mod in res.adapter.modules.items():
        assert by_name[name].similarity == pytest.approx(cos[name], abs=2e-5)
        assert (by_name[name].action == "projected") == (
            cos[name] <= (threshold if mode == "threshold" else sorted(cos.values())[num - 1])
        )
        scale = float(new_b[name].abs().max())
        assert torch.allclose(mod.lora_b.double(), new_b[name], atol=1e-5 * scale, rtol=1e-4), name
        assert (
            torch.equal(mod.lora_a, adapter.modules[name].lora_a) and mod.rank == adapter.modules[name].rank
        )
    return res.report.modules_touched


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("mode", "num", "threshold"), [("number", 3, 0.5), ("threshold", 10, 0.5)])
def test_matches_the_official_code_on_full_rank_deltas(seed, mode, num, threshold):
    """Random full-rank V of odd shapes (out < in, out > in), ||V||_F in 0.1-10, random rank-r LoRA."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 11), (13, 5), (16, 16), (9, 20), (24, 6), (5, 5)]
    deltas, mods = {}, {}
    for i, (out_f, in_f) in enumerate(shapes):
        name = f"model.layers.{i}.self_attn.q_proj"
        v = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        deltas[name] = v / v.norm() * 10 ** (torch.rand(1, generator=g).item() * 2 - 1)
        r = 1 + i % 4
        mods[name] = LoRAModule(
            name, torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), 2.0
        )
    adapter = LoRAAdapter({"r": 4, "lora_alpha": 8}, mods)
    options = {"select_layers_type": mode, "threshold": threshold, "num_proj_layers": num}
    touched = _check(deltas, adapter, _exact_reference(deltas), options, mode, threshold, num)
    if mode == "number":
        assert touched >= num  # ties at the cut are included, as in the official code


def test_matches_the_official_code_through_the_reference_build(tiny_models, tiny_spec):
    """The reference built from model folders with energy 1.0 gives the official operator."""
    base, aligned = tiny_models
    wa, wb = read_weights(aligned), read_weights(base)
    ref = AlignmentReference.build(aligned, base, energy=1.0, max_rank=10**6, progress=False)
    adapter = random_adapter(tiny_spec, rank=4, seed=5)
    adapter = LoRAAdapter(adapter.config, {n: m for n, m in adapter.modules.items() if n in ref.modules})
    deltas = {n: (wa[n + ".weight"] - wb[n + ".weight"]).double() for n in adapter.modules}
    assert all(meta.gram_error == pytest.approx(0.0, abs=1e-6) for meta in ref.manifest.modules.values())
    touched = _check(deltas, adapter, ref, {}, "number", 0.5, 10)
    assert touched >= 10


def test_the_operator_shrinks_by_the_spectrum_and_is_not_a_projector():
    """What separates the paper's C from U U^T: an update inside span(V) is rescaled by s_i^2/||V||_F."""
    u = torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)))[0]
    vh = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(1)))[0].T
    s = torch.tensor([3.0, 1.0])
    name = "model.layers.0.mlp.down_proj"
    ref = _exact_reference({name: (u * s) @ vh})
    mod = LoRAModule(name, torch.randn(1, 6), u[:, :1].clone(), 1.0)  # B along the top direction
    adapter = LoRAAdapter({"r": 1, "lora_alpha": 1}, {name: mod})
    out = repair(adapter, ref, "safelora", {"num_proj_layers": 1}).adapter.modules[name]
    factor = 9.0 / 10**0.5  # s_1^2 / ||V||_F
    assert torch.allclose(out.lora_b, factor * mod.lora_b, atol=1e-5)
    again = repair(LoRAAdapter(adapter.config, {name: out}), ref, "safelora", {"num_proj_layers": 1})
    assert not torch.allclose(again.adapter.modules[name].lora_b, out.lora_b)  # C C != C
    kept = repair(adapter, ref, "safelora_subspace", {"threshold": 1.0}).adapter.modules[name]
    assert torch.allclose(kept.lora_b, mod.lora_b, atol=1e-5)  # the variant's U U^T keeps it whole


def test_truncated_reference_reports_the_operator_error(tiny_models):
    base, aligned = tiny_models
    full = AlignmentReference.build(aligned, base, energy=1.0, max_rank=10**6, progress=False)
    cut = AlignmentReference.build(aligned, base, energy=1.0, max_rank=1, progress=False)
    wa, wb = read_weights(aligned), read_weights(base)
    for name, meta in cut.manifest.modules.items():
        v = (wa[name + ".weight"] - wb[name + ".weight"]).double()
        c = v @ v.T / v.norm()
        sub = cut.modules[name]
        ck = (sub.u.double() * sub.s.double() ** 2) @ sub.u.double().T / sub.delta_norm
        assert meta.gram_error == pytest.approx(float((c - ck).norm() / c.norm()), abs=1e-5)
        assert sub.delta_norm == pytest.approx(full.modules[name].delta_norm, rel=1e-6)
    adapter = random_adapter(seed=3)
    adapter = LoRAAdapter(adapter.config, {n: m for n, m in adapter.modules.items() if n in cut.modules})
    notes = repair(adapter, cut, "safelora", {"num_proj_layers": 4}).report.notes
    if max(m.gram_error or 0.0 for m in cut.manifest.modules.values()) > 0:
        assert any("||C - C_k||_F" in n for n in notes)


def test_a_zero_update_ranks_as_least_similar_as_in_the_official_code():
    """torch's cosine_similarity of a zero vector is 0 (eps-clamped norms), so the official code ranks a
    module whose B A is 0 first and it takes one of the num_proj_layers places."""
    g = torch.Generator().manual_seed(3)
    deltas, mods = {}, {}
    for i in range(3):
        name = f"model.layers.{i}.self_attn.q_proj"
        deltas[name] = torch.randn(6, 5, generator=g, dtype=torch.float64)
        b = torch.zeros(6, 2) if i == 1 else torch.randn(6, 2, generator=g)
        mods[name] = LoRAModule(name, torch.randn(2, 5, generator=g), b, 1.0)
    adapter = LoRAAdapter({"r": 2, "lora_alpha": 2}, mods)
    _, cos = official_projected_weighted(deltas, adapter, "number", 0.5, 1)
    assert cos["model.layers.1.self_attn.q_proj"] == 0.0
    assert _check(deltas, adapter, _exact_reference(deltas), {"num_proj_layers": 1}, "number", 0.5, 1) >= 1
    res = repair(adapter, _exact_reference(deltas), "safelora", {"num_proj_layers": 1})
    actions = {r.module: r.action for r in res.report.modules}
    assert actions["model.layers.1.self_attn.q_proj"] == "projected"


@pytest.mark.parametrize("seed", range(5))
def test_cancelling_rank_components_give_the_dense_cosine(seed):
    """Large factors whose product nearly cancels: Gram-product norms cancel catastrophically (they gave
    cosines of 2.6); the sums-of-squares form agrees with the dense official cosine."""
    g = torch.Generator().manual_seed(seed)
    name = "model.layers.0.mlp.down_proj"
    x = torch.randn(48, 2, generator=g, dtype=torch.float64) * 100
    y = torch.randn(2, 32, generator=g, dtype=torch.float64)
    b = torch.cat([x, x], 1) + 1e-6 * torch.randn(48, 4, generator=g, dtype=torch.float64)
    a = torch.cat([y, -y], 0)
    mod = LoRAModule(name, a.float(), b.float(), 1.0)
    deltas = {name: torch.randn(48, 32, generator=g, dtype=torch.float64)}
    adapter = LoRAAdapter({"r": 4, "lora_alpha": 4}, {name: mod})
    _, cos = official_projected_weighted(deltas, adapter, "threshold", 0.5, 1)
    res = repair(adapter, _exact_reference(deltas), "safelora", {"select_layers_type": "threshold"})
    sim = res.report.modules[0].similarity
    assert -1.0 <= sim <= 1.0
    assert sim == pytest.approx(cos[name], abs=2e-3)
