"""NeWTral translator: forward validity, routing, save/load, determinism, and that training works."""

from __future__ import annotations

import pytest
import torch

from vllm_safeguard.core.adapter import LoRAAdapter, LoRAModule
from vllm_safeguard.core.risk import score_adapter
from vllm_safeguard.errors import ConfigError, ReferenceArtifactError, RepairError
from vllm_safeguard.methods import repair
from vllm_safeguard.methods.translator import (
    Translator,
    TranslatorConfig,
    TranslatorManifest,
    build_dataset,
    train_translator,
)
from vllm_safeguard.methods.translator.representation import apply_shrink, fit_basis, optimal_shrink
from vllm_safeguard.methods.translator.train import fit_bases
from vllm_safeguard.testing.tiny import random_adapter


def _unsafe_variant(safe: LoRAAdapter, reference, strength: float, seed: int) -> LoRAAdapter:
    """safe + a component that cancels ``strength`` of the alignment delta (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, mod in safe.modules.items():
        sub = reference.modules[name]
        harm_b = -strength * (sub.u * sub.s) * (1 + 0.1 * torch.randn(sub.rank, generator=g))
        mods[name] = LoRAModule(
            name, torch.cat([mod.lora_a, sub.vh]), torch.cat([mod.scaled_b(), harm_b], 1), 1.0
        )
    return safe.replace_modules(mods)


@pytest.fixture(scope="module")
def pairs(tiny_reference, tiny_spec):
    out = []
    for i in range(8):
        safe = random_adapter(tiny_spec, rank=3, seed=100 + i, scale=0.05)
        out.append((_unsafe_variant(safe, tiny_reference, 0.6 + 0.05 * i, seed=i), safe))
    return out


@pytest.fixture(scope="module")
def trained(pairs):
    data = build_dataset(pairs[:6], k=4)
    cfg = TranslatorConfig(k=4, hidden=32, router_hidden=8, seed=0)
    return train_translator(data, cfg, expert_steps=150, router_steps=80, lr=1e-2, progress=False)


def _untrained(pairs, **kw) -> Translator:
    return Translator(TranslatorConfig(k=4, hidden=16, router_hidden=8, **kw), fit_bases(pairs[:2], 4))


def test_forward_validity_and_routing_sums_to_one(tiny_reference, pairs):
    model = _untrained(pairs)
    res = repair(pairs[0][0], tiny_reference, "translator", max_rank=8, artifacts={"translator": model})
    assert res.report.modules_touched == len(pairs[0][0].modules)
    for name, mod in res.adapter.modules.items():
        src = pairs[0][0].modules[name]
        assert mod.lora_a.shape[1] == src.in_features and mod.lora_b.shape[0] == src.out_features
        assert mod.rank <= min(8, src.rank)  # a shrink never adds rank
        assert mod.lora_a.isfinite().all() and mod.lora_b.isfinite().all()
    for rep in res.report.modules:
        assert rep.extra["w_surgical"] + rep.extra["w_aggressive"] == pytest.approx(1.0, abs=1e-6)
    assert res.report.summary["dominant_expert"] in ("surgical", "aggressive")


def test_untrained_translator_is_identity(tiny_reference, pairs):
    """Zero-initialised expert heads: before training the edit is exactly nothing (g = 0)."""
    model = _untrained(pairs)
    res = repair(
        pairs[0][0],
        tiny_reference,
        "translator",
        {"mode": "surgical"},
        max_rank=64,
        artifacts={"translator": model},
    )
    for name, mod in pairs[0][0].modules.items():
        assert torch.allclose(res.adapter.modules[name].delta(), mod.delta(), atol=1e-5)


def test_training_reduces_loss_and_repairs_held_out_pairs(trained, pairs, tiny_reference):
    model, history = trained
    for losses in history.values():
        assert losses[-1] < losses[0]
    for unsafe, safe in pairs[6:]:  # never seen in training
        before = score_adapter(unsafe, tiny_reference).score
        res = repair(unsafe, tiny_reference, "translator", max_rank=16, artifacts={"translator": model})
        after = score_adapter(res.adapter, tiny_reference).score
        assert before > 0.5 and after < 0.5 * before
        # fidelity: the translated update is closer to the matched safe adapter than the unsafe one was
        dist_before = sum(
            float((unsafe.modules[n].delta() - safe.modules[n].delta()).norm()) for n in safe.modules
        )
        dist_after = sum(
            float((res.adapter.modules[n].delta() - safe.modules[n].delta()).norm()) for n in safe.modules
        )
        assert dist_after < dist_before


def test_cross_fit_views_each_pair_in_the_other_pairs_basis(pairs):
    from vllm_safeguard.methods.translator.representation import n_layers_of, view_module

    three = pairs[:3]
    data = build_dataset(three, k=4)
    full = fit_bases(three, 4)
    assert data.basis.keys() == full.keys()  # the artifact carries the basis of all pairs
    for name in full:
        assert torch.equal(data.basis[name].u, full[name].u)
    others = fit_bases(three[1:], 4)
    n_layers = n_layers_of(list(full))
    for i, name in enumerate(data.names[: len(full)]):  # pair 0's modules come first
        view = view_module(three[0][0].modules[name], others[name], n_layers)
        assert torch.allclose(data.energy[i], view.energy)
        target = optimal_shrink(three[0][0].modules[name], three[0][1].modules[name], others[name])
        assert torch.allclose(data.g_star[i], target.clamp(0.0, 2.0))
    in_sample = build_dataset(three, k=4, cross_fit=False)
    assert not torch.allclose(in_sample.energy, data.energy)
    # one pair: nothing to hold out, its own basis
    one = build_dataset(pairs[:1], k=4)
    assert torch.equal(one.energy, build_dataset(pairs[:1], k=4, cross_fit=False).energy)


def test_strength_scales_the_edit(trained, pairs, tiny_reference):
    """``strength`` t: dW' = dW - t U diag(g) U^T dW, so the edit is linear in t and t=0 is no edit."""
    model, _ = trained
    unsafe = pairs[7][0]

    def edit(t: float) -> dict[str, torch.Tensor]:
        res = repair(
            unsafe,
            tiny_reference,
            "translator",
            {"mode": "aggressive", "strength": t},
            max_rank=64,
            artifacts={"translator": model},
        )
        assert f"strength {t:g}" in res.report.notes[0]
        return {n: unsafe.modules[n].delta() - m.delta() for n, m in res.adapter.modules.items()}

    zero, one, two = edit(0.0), edit(1.0), edit(2.0)
    assert any(float(d.norm()) > 1e-3 for d in one.values())  # a trained expert does edit
    for name in one:
        assert torch.allclose(zero[name], torch.zeros_like(zero[name]), atol=1e-6)
        assert torch.allclose(two[name], 2 * one[name], atol=1e-5)
    for bad in (-0.5, 4.5, float("nan")):
        with pytest.raises(ConfigError, match="strength"):
            repair(unsafe, tiny_reference, "translator", {"strength": bad}, artifacts={"translator": model})


def test_save_load_round_trip_and_tamper(tmp_path, trained, pairs, tiny_reference):
    model, _ = trained
    out = model.save(tmp_path / "tr", TranslatorManifest(config=model.config))
    loaded, manifest = Translator.load(out)
    assert manifest.config == model.config
    assert loaded.basis.keys() == model.basis.keys()
    for name, basis in model.basis.items():
        assert torch.equal(loaded.basis[name].u, basis.u) and torch.equal(loaded.basis[name].s, basis.s)
    a = repair(pairs[7][0], tiny_reference, "translator", artifacts={"translator": model}).adapter
    b = repair(pairs[7][0], tiny_reference, "translator", artifacts={"translator": loaded}).adapter
    for name in a.modules:
        assert torch.equal(a.modules[name].lora_b, b.modules[name].lora_b)
    (out / "translator.safetensors").write_bytes((out / "translator.safetensors").read_bytes()[:-2] + b"xx")
    with pytest.raises(ReferenceArtifactError, match="sha256"):
        Translator.load(out)


def test_determinism_with_seed(pairs, tiny_reference):
    data = build_dataset(pairs[:2], k=4)
    cfg = TranslatorConfig(k=4, hidden=16, router_hidden=8, seed=3)
    m1, h1 = train_translator(data, cfg, expert_steps=10, router_steps=5, progress=False)
    m2, h2 = train_translator(data, cfg, expert_steps=10, router_steps=5, progress=False)
    assert h1 == h2
    for (k1, v1), (_, v2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(v1, v2), k1


def test_translator_method_needs_an_artifact(tiny_reference, pairs):
    with pytest.raises(RepairError, match="translator"):
        repair(pairs[0][0], tiny_reference, "translator")
    bare = Translator(TranslatorConfig(k=4, hidden=16, router_hidden=8))  # no basis: nothing it can edit
    with pytest.raises(RepairError, match="no basis for any module"):
        repair(pairs[0][0], tiny_reference, "translator", artifacts={"translator": bare})


def test_basis_finds_the_correction_direction_and_shrink_targets_it() -> None:
    """Pairs whose safe adapter is the unsafe one minus a component along one output direction u0:
    the basis's first direction is u0 and the optimal shrink there is 1 (elsewhere: nothing to fix)."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 12, 10, 3
    u0 = torch.nn.functional.normalize(torch.randn(out_f, generator=g), dim=0)
    pairs = []
    for _ in range(3):
        a_task, b_task = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g) * 0.1
        a_harm = torch.randn(1, in_f, generator=g)
        safe = LoRAModule("model.layers.0.mlp.down_proj", a_task, b_task, 1.0)
        unsafe = LoRAModule(
            safe.name, torch.cat([a_task, a_harm]), torch.cat([b_task, 2.0 * u0[:, None]], 1), 1.0
        )
        pairs.append((unsafe, safe))
    basis = fit_basis(pairs, k=2)
    assert torch.allclose(basis.u.T @ basis.u, torch.eye(2), atol=1e-5)
    assert abs(float(basis.u[:, 0] @ u0)) > 0.999 and float(basis.s[1]) < 1e-4 * float(basis.s[0])
    unsafe, safe = pairs[0]
    g_star = optimal_shrink(unsafe, safe, basis)
    # direction 0 holds the harm plus the task's small share along u0: g* = 1 - <a,b>/|a|^2 < 1 but close
    assert 0.9 < float(g_star[0]) <= 1.0
    fixed, ratio = apply_shrink(unsafe, basis, torch.tensor([1.0, 0.0]))
    assert torch.allclose(u0 @ fixed.delta(), torch.zeros(in_f), atol=1e-5)  # nothing left along u0
    assert fixed.rank == unsafe.rank and 0 < ratio < 1


def test_cli_train_and_repair(tmp_path, pairs, tiny_reference):
    import json

    from typer.testing import CliRunner

    from vllm_safeguard.apps.cli import app
    from vllm_safeguard.core.adapter_io import load_adapter, save_adapter

    ref_dir = tiny_reference.save(tmp_path / "ref")
    spec = []
    for i, (unsafe, safe) in enumerate(pairs[:3]):
        spec.append(
            {
                "unsafe": str(save_adapter(unsafe, tmp_path / f"u{i}")),
                "safe": str(save_adapter(safe, tmp_path / f"s{i}")),
            }
        )
    (tmp_path / "pairs.json").write_text(json.dumps(spec))
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "translator",
            "train",
            "--pairs",
            str(tmp_path / "pairs.json"),
            "--reference",
            str(ref_dir),
            "--out",
            str(tmp_path / "tr"),
            "--k",
            "4",
            "--hidden",
            "16",
            "--expert-steps",
            "20",
            "--router-steps",
            "10",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tr" / "translator.json").is_file() and "router: loss" in r.output
    r = runner.invoke(
        app,
        [
            "repair",
            spec[0]["unsafe"],
            "--method",
            "translator",
            "--reference",
            str(ref_dir),
            "--translator",
            str(tmp_path / "tr"),
            "--out",
            str(tmp_path / "rep"),
            "--max-rank",
            "16",
        ],
    )
    assert r.exit_code == 0, r.output
    assert load_adapter(tmp_path / "rep").max_rank <= 16
